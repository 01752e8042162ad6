"""A large image through the network one stage at a time, each stage in chunks.

One pass of a fully convolutional network over a large image is slow on a CPU for a
reason that has nothing to do with arithmetic: its activations (a DenseNet block holds
256 channels at a quarter of the image size) do not fit in any cache, and every layer
streams them through memory. The map is the same when the network runs stage by stage:
the graph is cut where a single map carries everything forward (between a ResNet's or a
DenseNet's stages), each stage runs over its input map in chunks of about ``CHUNK``
image pixels a side, each chunk with the halo of that stage's own receptive field (a few
cells, not the whole network's), and the chunks' cells are put together into the stage's
output map. This is tiling (``nofc.tiling``) inside one pass: a chunk starts on a
multiple of the stage's stride and reaches as far as its last cell's field, clipped to
the map, so every cell equals the whole map's cell. Peak memory is the maps at the cuts,
not every layer's activations.

Only what the layer-by-layer geometry reads is streamed: a network with global context
(squeeze-and-excitation), measured geometry, or a stage with a node the walk does not
know runs that stage (or the network) whole. Only on a CPU, where the chunks (or the
whole image of a large pass that cannot be streamed) are handed over in the layout
``nofc.layout`` chose for the network: channels-last where a measurement on a chunk-sized
crop says it is faster (oneDNN's convolutions run most networks 1.1x to 1.7x faster so,
bfloat16 ones only there at the matrix units' speed), contiguous where not; a GPU keeps
its cores busy on the whole map.

>>> import torch, torchvision, nofc
>>> fcn = nofc.convert(torchvision.models.resnet18(), (3, 224, 224))
>>> geo = nofc.geometry(fcn, (3, 224, 224))
>>> [(s.output, s.scale[0]) for s in stages(fcn, geo, 3)]  # doctest: +NORMALIZE_WHITESPACE
[('layer1_1_relu_1', 4), ('layer2_1_relu_1', 8), ('layer3_1_relu_1', 16),
 ('avgpool', 32), ('fc', 32)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ._fx import output_node, param_like, probe, trace
from .errors import NofcError
from .layout import known_format, memory_format_for
from .receptive import node_axes
from .windows import Geometry

__all__ = ["stages", "streamed", "RowStream", "row_stream", "STREAM_PIXELS", "MEASURE_PIXELS",
           "CHUNK"]

STREAM_PIXELS = 1024 * 1024  # images with more pixels than this run stage by stage
# images with at least this many pixels run in the layout measured faster for their network
# (nofc.layout; once per architecture and process: six passes of a CHUNK-sized crop, about
# two passes of an 896x896 image); smaller ones keep their own layout
MEASURE_PIXELS = 640 * 640
CHUNK = 512  # image pixels a chunk of any stage covers, a side (cache-sized activations)
_HALO_SHARE = 4  # a chunk's cells cover at least this many times the stage's halo


@dataclass(frozen=True)
class Stage:
    """One piece of the network between two cuts, with its own geometry."""

    module: fx.GraphModule  # input map -> output map
    geo: Geometry  # the stage's cells from its input map (stride, field, sizes)
    output: str  # the node the stage ends at
    scale: tuple[int, int]  # image pixels per cell of its output map
    chunked: bool  # False: the stage has a node the geometry does not read; run it whole


def stages(fcn: nn.Module, geo: Geometry, channels: int) -> list[Stage] | None:
    """The network cut into stages at the maps that carry everything forward, or None
    where it cannot be streamed (global context, measured geometry, one stage only).

    Remembered on ``fcn`` for ``geo`` and the device and dtype of its parameters (a
    stage holds the network's own layers, but a constant it fetches is its own).
    """
    if callable(getattr(fcn, "geometry_for", None)):
        return None  # a network that states its own geometry runs as it is (nofc.crops)
    cache = fcn.__dict__.setdefault("_nofc_stages_cache", {})
    key = (geo.window, geo.stride, geo._output, param_like(fcn))
    if key not in cache:
        cache[key] = _cut(fcn, geo, channels)
    return cache[key]


def _cut(fcn: nn.Module, geo: Geometry, channels: int) -> list[Stage] | None:
    if (geo.measured or geo._shape_of is not None or not geo._nodes
            or geo.global_context):
        return None
    gm = fcn if isinstance(fcn, fx.GraphModule) else trace(fcn)
    out = output_node(gm)
    if not isinstance(out, fx.Node) or out.name != geo._output:
        return None
    absolute = node_axes(geo._nodes)
    nodes = list(gm.graph.nodes)
    shapes = probe(gm, (1, channels, *geo.window)).shapes
    sizes = geo._sizes(geo.window)
    # candidate cuts: after node n, n is the only value (other than parameters) still used
    pos = {n: i for i, n in enumerate(nodes)}
    open_until: dict[int, int] = {}
    candidates = []
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        last = max((pos[u] for u in n.users), default=i)
        if n.op != "get_attr" and last > i:
            open_until[last] = open_until.get(last, 0) + 1
        open_until.pop(i, None)
        alive = sum(open_until.values())
        shape = shapes.get(n.name)
        if (alive == 1 and last > i and n.name in absolute
                and shape is not None and len(shape) == 4
                and tuple(shape[2:]) == sizes.get(n.name)):  # (B, C, H, W), not channels-last
            candidates.append(n)
    # per stride, the cut with the fewest values per image pixel (ties: the last)
    best: dict[tuple[int, int], tuple[float, fx.Node]] = {}
    for n in candidates:
        jump = absolute[n.name].jump
        density = shapes[n.name][1] / (jump[0] * jump[1])
        if jump not in best or density <= best[jump][0]:
            best[jump] = (density, n)
    # a cut map much larger than the image (a stem's 64 channels at stride 2) would cost
    # more memory than it saves
    limit = max(8, 4 * channels)
    cuts = sorted((n for density, n in best.values()
                   if n.op != "placeholder" and n is not out and density <= limit), key=pos.get)
    if not cuts:
        return None
    first = next(n for n in nodes if n.op == "placeholder")
    bounds = [first, *cuts, out]
    result = []
    for u, v in zip(bounds, bounds[1:]):
        inner = nodes[pos[u] + 1:pos[v] + 1]
        result.append(_stage(gm, u, v, inner, geo._nodes, absolute[v.name].jump))
    return result if len(result) > 1 else None


def _stage(gm, u: fx.Node, v: fx.Node, inner: list, walk_nodes, scale) -> Stage:
    """The sub-graph from map ``u`` to map ``v`` as a module, and its geometry."""
    graph = fx.Graph()
    env = {u: graph.placeholder("x")}

    def arg(a: fx.Node):
        if a not in env:  # a parameter fetched before the cut
            env[a] = graph.node_copy(a, arg)
        return env[a]

    for n in inner:
        env[n] = graph.node_copy(n, arg)
    graph.output(env[v])
    module = fx.GraphModule(gm, graph)
    names = {n.name for n in inner}
    own = [e for e in walk_nodes if e[0] in names]
    ax = node_axes([(u.name, "input", (), None), *own], u.name)
    # chunked only when every node of the stage is a map the walk recorded (or a
    # parameter): a node that reads the map's size would see the chunk's; and when its
    # output is a lattice of its input's cells (not one that an upsampling left in groups)
    final = ax.get(v.name)
    chunked = (final is not None and final.period == final.jump
               and all(n.op == "get_attr" or n.name in ax for n in inner))
    jump, field, start = ((1, 1), (1, 1), (0, 0)) if final is None else (
        final.jump, final.size, final.start)
    geo = Geometry(jump, (0, 0), (1, 1), True, field, start,
                   _nodes=((u.name, "input", (), None), *own), _output=v.name)
    return Stage(module, geo, v.name, scale, chunked)


def streamed(fcn: nn.Module, geo: Geometry, x: torch.Tensor) -> torch.Tensor:
    """``fcn(x)``, stage by stage in chunks where ``x`` is large enough to gain from it.

    >>> import torch, torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.resnet18(), (3, 224, 224)).eval()
    >>> geo = nofc.geometry(fcn, (3, 224, 224))
    >>> x = torch.randn(1, 3, 600, 500)
    >>> with torch.no_grad():
    ...     torch.allclose(_run(stages(fcn, geo, 3), x, chunk=128), fcn(x), atol=1e-4)
    True
    """
    if geo.lattice:  # runs on the window plus a multiple of the stride only
        h, w = geo.fit(x.shape[-2:])
        x = x[..., :h, :w]
    if x.device.type != "cpu":
        return fcn(x)  # a GPU keeps its cores busy on the whole map: no chunks there
    if callable(getattr(fcn, "geometry_for", None)):
        # a network that states its own geometry (crop by crop, ONNX, another engine)
        # runs as it is: its own layout, no stages, and no measuring (crop by crop, a
        # measurement would be thousands of classifier calls)
        return fcn(x)
    pixels = x.shape[-2] * x.shape[-1]
    fmt = _layout(fcn, geo, x)
    if pixels <= STREAM_PIXELS:  # one pass of the whole network
        return fcn(x) if fmt is None else _call(fcn, x, fmt)
    parts = stages(fcn, geo, x.shape[1])
    if parts is None:
        return _call(fcn, x, fmt)
    if geo.lattice:
        # a chunk starts on its stage's grid, so what it computes is exact, but its size
        # may be one the stage's branches do not meet at (DLA's adds): then run whole
        try:
            return _run(parts, x, chunk=CHUNK, fmt=fmt)
        except RuntimeError:
            return _call(fcn, x, fmt)
    return _run(parts, x, chunk=CHUNK, fmt=fmt)


def _layout(net: nn.Module, geo: Geometry, x: torch.Tensor) -> torch.memory_format | None:
    """The layout a pass of ``net`` over ``x`` runs in: measured for a large pass (or
    known), else known; None: the input's own layout."""
    pixels = x.shape[-2] * x.shape[-1]
    if pixels >= MEASURE_PIXELS or pixels > STREAM_PIXELS:
        return memory_format_for(net, _sample(x, geo))
    return known_format(x.device, x.dtype)


def _sample(x: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """A crop of the first image the size a chunk runs at (``CHUNK``, at least the
    window; on the lattice of a lattice network): what the layout is measured on."""
    side = [min(x.shape[-2 + a], max(CHUNK, geo.window[a])) for a in (0, 1)]
    h, w = geo.fit(side)
    return x[:1, :, :h, :w]


def _run(parts: list[Stage], x: torch.Tensor, *, chunk: int,
         fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    for stage in parts:
        x = _run_stage(stage, x, chunk, fmt)
    return x.contiguous()


def _per(stage: Stage, chunk: int, axis: int, cells: int) -> int:
    """Output cells per chunk along ``axis``: about ``chunk`` image pixels, and at least
    ``_HALO_SHARE`` times the halo; the whole axis when that is not much more."""
    halo = stage.geo.receptive_field[axis] / stage.geo.stride[axis]
    per = max(1, math.ceil(chunk / stage.scale[axis]), math.ceil(_HALO_SHARE * halo))
    return cells if cells <= 1.5 * per else per


def _run_stage(stage: Stage, x: torch.Tensor, chunk: int,
               fmt: torch.memory_format) -> torch.Tensor:
    H, W = x.shape[-2:]
    h, w = stage.geo.network_shape((H, W)) if stage.chunked else (0, 0)
    per = (_per(stage, chunk, 0, h), _per(stage, chunk, 1, w)) if stage.chunked else (0, 0)
    if not stage.chunked or per == (h, w):
        return _call(stage.module, x, fmt)
    out = None
    for a in range(0, h, per[0]):
        b = min(h, a + per[0])
        y0, y1, sy = stage.geo.span(0, a, b, H)
        for c in range(0, w, per[1]):
            d = min(w, c + per[1])
            x0, x1, sx = stage.geo.span(1, c, d, W)
            # a copy: a stage may work in place on its input (ReLU(inplace=True)), and the
            # chunks' halos overlap
            region = x[..., y0:y1, x0:x1].clone(memory_format=fmt)
            part = _call(stage.module, region, fmt)[..., sy:sy + b - a, sx:sx + d - c]
            if part.shape[-2:] != (b - a, d - c):  # pragma: no cover - a planning bug
                raise NofcError(f"internal: stage {stage.output!r} chunk gave "
                                f"{tuple(part.shape)} for cells {(a, b, c, d)}")
            if out is None:
                out = torch.empty((*part.shape[:2], h, w), dtype=part.dtype,
                                  device=part.device, memory_format=_format(part))
            out[..., a:b, c:d] = part
    return out


class RowStream:
    """The map cells of columns ``cols`` of an ``hw`` image, computed band by band from
    the top: each stage keeps the rows of its input map that its next rows need (a few
    cells of its own field), so no cell of any stage is computed twice. Across the
    columns, the strip's image region reaches as far as its cells' fields, as a tile does.

    What ``nofc.tiling`` runs over a large image on a CPU instead of tiles whose halos (a
    DenseNet-121's 2263-pixel field) are computed once per tile: a band costs its own rows
    (and its stages' chunk halos, as in one streamed pass), not the network's field.

    ``read(a, b)`` says which image region the band of map rows ``a..b-1`` needs (it
    changes nothing: a reader thread may ask ahead); ``advance(x, b)`` takes that region
    (``(B, C, rows, cols)``, normalised) and returns those map rows. The stream starts at
    map row ``start``; each band starts where the last one ended.

    >>> import torch, torchvision, nofc
    >>> fcn = nofc.convert(torchvision.models.resnet18(), (3, 224, 224)).eval()
    >>> geo = nofc.geometry(fcn, (3, 224, 224))
    >>> x = torch.randn(1, 3, 700, 400)
    >>> stream = row_stream(fcn, geo, (700, 400), (0, 6))
    >>> parts = []
    >>> for a, b in ((0, 5), (5, 9), (9, 16)):
    ...     y0, y1, x0, x1 = stream.read(a, b)
    ...     with torch.no_grad():
    ...         parts.append(stream.advance(x[..., y0:y1, x0:x1], b))
    >>> with torch.no_grad():
    ...     torch.allclose(torch.cat(parts, -2), fcn(x)[..., :16, :6], atol=1e-4)
    True
    """

    def __init__(self, net: nn.Module, geo: Geometry, parts: list[Stage],
                 hw: tuple[int, int], cols: tuple[int, int], start: int = 0):
        self.net, self.geo, self.parts, self.start = net, geo, parts, start
        sizes = [tuple(hw)]
        for stage in parts:  # every stage's whole map, as the whole image gives it
            sizes.append(stage.geo.network_shape(sizes[-1]))
        self.sizes = sizes
        # the columns each stage's map keeps (fixed for the strip), from the last back
        spans: list = [None] * len(sizes)
        spans[-1] = (cols[0], cols[1], 0)
        for s in range(len(parts), 0, -1):
            lo, hi = spans[s][:2]
            x0, x1, sx = parts[s - 1].geo.span(1, lo, hi, sizes[s - 1][1])
            spans[s] = (lo, hi, sx)  # sx: the first kept column in the stage's output
            spans[s - 1] = (x0, x1, 0)
        self.cols = spans
        # where each map's rows start: the first of the fields of the next map's first row
        starts = [0] * len(sizes)
        starts[-1] = start
        for s in range(len(parts), 0, -1):
            starts[s - 1] = parts[s - 1].geo.span(0, starts[s], starts[s] + 1,
                                                  sizes[s - 1][0])[0]
        self.starts = tuple(starts)
        self.done = list(starts)  # each map's rows computed so far
        self.first = list(starts)  # the map row maps[s] starts at
        self.maps: list[torch.Tensor | None] = [None] * len(sizes)  # the rows each keeps
        self.fmt: torch.memory_format | None = None

    @property
    def band(self) -> int:
        """Image rows a band should span at least: each stage's rows at least
        ``_HALO_SHARE`` times its own halo, as a chunk of one streamed pass."""
        return max(math.ceil(_HALO_SHARE * st.geo.receptive_field[0] / st.geo.stride[0])
                   * st.scale[0] for st in self.parts)

    def _ends(self, b: int) -> list[int]:
        """The row each map must be computed to for map rows up to ``b``."""
        need = [0] * len(self.sizes)
        need[-1] = b
        for s in range(len(self.parts), 0, -1):
            need[s - 1] = self.parts[s - 1].geo.span(0, max(0, need[s] - 1), need[s],
                                                     self.sizes[s - 1][0])[1]
        return need

    def read(self, a: int, b: int) -> tuple[int, int, int, int]:
        """The image region ``(y0, y1, x0, x1)`` the band of map rows ``a..b-1`` needs,
        beyond what the stream keeps from the band before."""
        y0 = self.starts[0] if a == self.start else self._ends(a)[0]
        return (y0, max(y0, self._ends(b)[0]), *self.cols[0][:2])

    def advance(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """The map rows from where the stream is to ``b`` (its ``cols``), from the image
        region ``read`` named."""
        if b <= self.done[-1]:
            raise NofcError(f"internal: a row stream at map row {self.done[-1]} asked for "
                            f"rows up to {b}")
        need = [max(n, d) for n, d in zip(self._ends(b), self.done)]
        if x.shape[-2] != need[0] - self.done[0]:  # pragma: no cover - a planning bug
            raise NofcError(f"internal: a row stream needs image rows {self.done[0]}.."
                            f"{need[0]}, got {x.shape[-2]}")
        if self.fmt is None:  # as for one pass, on the first band
            self.fmt = _layout(self.net, self.geo, x) or torch.contiguous_format
        self._keep(0, x, need[0])
        for s, stage in enumerate(self.parts, 1):
            if need[s] <= self.done[s]:
                continue
            H = self.sizes[s - 1][0]
            y0, y1, sy = stage.geo.span(0, self.done[s], need[s], H)
            top = self.first[s - 1]
            region = self.maps[s - 1][..., y0 - top:y1 - top, :]
            if region.shape[-2] != y1 - y0:  # pragma: no cover - a planning bug
                raise NofcError(f"internal: stage {stage.output!r} needs rows {y0}..{y1} "
                                f"of a map kept from row {top}")
            lo, hi, sx = self.cols[s]
            rows = need[s] - self.done[s]
            part = _run_stage(stage, region, CHUNK, self.fmt)[..., sy:sy + rows,
                                                              sx:sx + hi - lo]
            if part.shape[-2:] != (rows, hi - lo):  # pragma: no cover - a planning bug
                raise NofcError(f"internal: stage {stage.output!r} gave {tuple(part.shape)} "
                                f"for {rows} rows of {hi - lo} cells")
            self._keep(s, part, need[s])
            # the rows of the stage's input its later rows still read
            after = need[s]
            keep = (stage.geo.span(0, after, after + 1, H)[0] if after < self.sizes[s][0]
                    else H)
            self._drop(s - 1, keep)
        out, self.maps[-1] = self.maps[-1], None
        self.first[-1] = b
        return out.contiguous()

    def _keep(self, s: int, rows: torch.Tensor, end: int) -> None:
        """Rows up to ``end`` of map ``s`` join the ones it keeps."""
        kept = self.maps[s]
        self.maps[s] = rows if kept is None or kept.shape[-2] == 0 else torch.cat((kept, rows), -2)
        if kept is None or kept.shape[-2] == 0:
            self.first[s] = end - rows.shape[-2]
        self.done[s] = end

    def _drop(self, s: int, keep: int) -> None:
        """Map ``s`` forgets its rows before ``keep``."""
        kept = self.maps[s]
        cut = min(max(0, keep - self.first[s]), kept.shape[-2])
        self.maps[s] = kept[..., cut:, :]
        self.first[s] += cut


def row_stream(net: nn.Module, geo: Geometry, hw: tuple[int, int], cols: tuple[int, int],
               *, start: int = 0, channels: int = 3) -> RowStream | None:
    """A :class:`RowStream` over the map columns ``cols`` of an ``hw`` image, or None
    where the network cannot be run so: it states its own geometry, it is not cut into
    stages that all run in chunks (global context, a node the walk does not read), or it
    runs on a lattice of window sizes only."""
    if geo.lattice or callable(getattr(net, "geometry_for", None)):
        return None
    parts = stages(net, geo, channels)
    if parts is None or not all(stage.chunked for stage in parts):
        return None
    return RowStream(net, geo, parts, hw, cols, start)


def _format(t: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last if t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def _call(module: nn.Module, x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``module(x)`` with ``x`` in layout ``fmt``; channels-last falls back to the plain
    layout for a graph that needs it (a ``view``)."""
    if fmt == torch.channels_last and x.dim() == 4:
        try:
            return module(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            pass
        return module(x.contiguous())
    return module(x.contiguous(memory_format=fmt) if x.dim() == 4 else x)
