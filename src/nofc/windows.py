"""Which input window each cell of a fully convolutional map saw: the ``Geometry`` value.

Convention. A map has one cell per window of the reference size ``(H, W)`` (the
``(C, H, W)`` the classifier was converted for) wholly inside the image, by default
(``edges="inside"``; with "zeros" or "reflect" the image is padded so that windows cover
every pixel, see ``Geometry.with_edges``). Cell ``(i, j)`` stands for the window

    ``(y0, x0, y1, x1) = (oy + i*sy, ox + j*sx, oy + i*sy + H, ox + j*sx + W)``

with ``stride = (sy, sx)``, ``offset = (oy, ox)`` and ``window = (H, W)``: the classifier
run on that crop gives the cell's value whenever ``exact`` is True (no padding, no
``ceil_mode`` pooling, no global context such as squeeze-and-excitation). With padding the
cell and the crop differ near the borders the crop does not share with the image; the
grids still line up, so the box is still the crop to compare with, and
``nofc.verify(model, fcn, input_size, image=...)`` measures how far apart they are. The
network itself may give more cells, for windows past the bottom and right edges
(``network_shape``); every caller crops them.

``receptive_field`` and ``rf_offset`` are the region of the input that can influence
cell (0, 0) (``rf_offset`` is negative when padding reaches outside the image); it can be
larger than the window (VGG16: 404 > 224, padding) or smaller (pooling that floors).

Steps. A map computed with a step finer than the stride (shift-and-stitch) keeps the same
windows, ``step`` pixels apart. ``Geometry`` is the one place that knows what a step does:
``check_step`` validates it, and ``output_shape``, ``boxes``, ``centers`` and ``extent``
take ``step=`` (default: the stride).

This module holds the value and its arithmetic only. ``nofc.geometry`` (in
``nofc.receptive``) derives it from the layers, or, where a layer cannot be read, from
measurements (``nofc.measure``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import NofcError

__all__ = ["Geometry", "parse_step", "EDGES"]

EDGES = ("inside", "zeros", "reflect")  # what a map does at the image's edges


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
    # "inside": one cell per window wholly inside the image; "zeros"/"reflect": the image
    # padded so that windows cover every pixel (``with_edges``)
    edges: str = "inside"
    # why cells see the whole image (squeeze-and-excitation, attention over all positions,
    # a field nofc cannot bound): empty when they do not; code tests this, people read it
    global_context: tuple[str, ...] = ()
    # the walk's record (``nofc.receptive``): (name, kind, inputs, layer) per map node, and
    # the output node; a measured geometry has no record and runs the network for its map
    # size instead (``_shape_of``, ``nofc.measure``)
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
        """``(h, w)`` of the map for an ``(H, W)`` image: one cell per window that lies
        wholly inside it, ``(H - window_h) // step_y + 1`` rows (0 when the image is
        smaller than a window), as crop by crop (``sliding_window_predict``) gives. With
        ``edges`` "zeros" or "reflect" the image is padded on all four sides so that
        windows cover every pixel: ``ceil((H - window_h) / step_y) + 1`` rows.

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> geo.output_shape((70, 61)), geo.output_shape((70, 61), step=1)
        ((10, 8), (39, 30))
        >>> geo.with_edges((70, 61), "zeros").output_shape((70, 61))
        (11, 9)
        """
        hw = _hw(image_size)
        steps = self.check_step(step)
        return tuple(self._cells(hw[a], a, steps[a]) for a in (0, 1))  # type: ignore

    def _cells(self, n: int, axis: int, step: int) -> int:
        """Cells along ``axis`` for ``n`` image pixels, ``step`` apart: the one rule that
        ``output_shape``, ``padding`` and ``check_fits`` follow (no pixels, no cells)."""
        if n < 1:
            return 0
        if self.edges == "inside":
            return max((n - self.offset[axis] - self.window[axis]) // step + 1, 0)
        return max(-(-(n - self.window[axis]) // step), 0) + 1

    def padding(self, image_size, *, step=None) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` pixels that ``edges`` adds around an ``(H, W)``
        image so that its windows, ``step`` apart, cover every pixel: split evenly, the
        odd pixel at the bottom or right; all 0 for ``edges="inside"``.

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> geo.padding((70, 61)), replace(geo, edges="reflect").padding((70, 61))
        ((0, 0, 0, 0), (1, 1, 1, 2))
        """
        hw = _hw(image_size)
        steps = self.check_step(step)
        if self.edges == "inside":
            return (0, 0, 0, 0)
        pads = []
        for a in (0, 1):
            total = (self._cells(hw[a], a, steps[a]) - 1) * steps[a] + self.window[a] - hw[a]
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]

    def with_edges(self, image_size, edges: str, *, step=None) -> "Geometry":
        """The geometry of the map of one ``(H, W)`` image with ``edges``: "inside" (this
        geometry) or "zeros"/"reflect", padded as ``padding`` says; its ``offset`` is then
        where the first window starts in the image (negative: in the padding), so boxes,
        centres, extents and placements of that map need nothing else.

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> pad = geo.with_edges((70, 61), "zeros")
        >>> pad.offset, pad.boxes((70, 61))[-1, -1].tolist()
        ((-1, -1), [39, 31, 71, 63])
        """
        if edges not in EDGES:
            raise NofcError(f"edges must be one of {', '.join(map(repr, EDGES))}, got {edges!r}")
        if edges == "inside":
            return replace(self, edges="inside", offset=(0, 0))
        padded = replace(self, edges=edges, offset=(0, 0))
        top, _, left, _ = padded.padding(image_size, step=step)
        return replace(padded, offset=(-top, -left))

    def network_shape(self, image_size) -> tuple[int, int]:
        """The map the network itself gives at its stride on an ``(H, W)`` image (on the
        image ``fit`` keeps): at least ``output_shape``, more where padding or
        ``ceil_mode`` pooling gives cells for windows past the bottom or right edge,
        which every caller crops. Layer by layer (the nodes the walk recorded), or by a
        shape-only run where the geometry was measured."""
        hw = self.fit(image_size)
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
            elif kind in ("layer", "upsample"):
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

        Every box lies inside the image, except with ``edges`` "zeros"/"reflect"
        (``with_edges``), whose boxes reach into the padding on all four sides.
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
        """Raise when an ``(H, W)`` image has no map cell: it is smaller than one window
        (with ``edges`` "zeros" or "reflect", padded to at least one: smaller than 1x1)."""
        hw = _hw(image_size)
        if all(self._cells(hw[a], a, self.stride[a]) for a in (0, 1)):
            return
        need = self.min_size() if self.edges == "inside" else (1, 1)
        raise NofcError(f"{what} is {hw[0]}x{hw[1]}, smaller than the {need[0]}x{need[1]} "
                        f"window; pad or resize it to at least {need[0]}x{need[1]}")

    def as_dict(self) -> dict:
        """Plain-Python form (for JSON next to saved score maps)."""
        return {
            "stride": list(self.stride), "offset": list(self.offset),
            "window": list(self.window), "exact": self.exact,
            "receptive_field": list(self.receptive_field), "rf_offset": list(self.rf_offset),
            "reasons": list(self.reasons), "measured": self.measured,
            "lattice": self.lattice, "edges": self.edges,
            "global_context": list(self.global_context),
            "box_convention": "cell (i, j) -> (y0, x0, y1, x1) = (oy + i*sy, ox + j*sx, "
                              "y0 + window_h, x0 + window_w), pixel rows y0..y1-1",
        }
