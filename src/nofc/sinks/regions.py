"""Merged regions: per class, its map cells merged into polygons with holes.

A cell is in class ``k``'s regions when ``k`` is its top class and its probability reaches
``threshold``: the rule of the per-cell GeoJSON (``nofc.sinks.geojson``), so that a class's
regions are exactly the union of its cell squares there (the cell ``(col, row)`` is the
``step x step`` square centred on its window, :meth:`nofc.placement.Placement.cell_transform`).
Cells that share an edge are one polygon, with holes where other cells are; corners lie on
the cell grid, with no vertex between two corners. Each region carries its class, its area
(µm² for a slide whose pixel size is known, else level-0 pixels²; a scene's map units²,
m² for UTM), the mean and the largest probability of its class over its cells, and how many
cells it has. Classes in ``exclude`` (a background) are left out; their cells are holes.

The format goes by the suffix: ``.regions.geojson`` (or any ``.geojson`` given as a
:class:`RegionsOutput`): QuPath annotations for a slide (level-0 pixels), RFC 7946 GeoJSON
for a scene (WGS84 longitude and latitude, the scene's CRS in the ``"nofc"`` member);
``.gpkg`` and ``.fgb``: a GeoPackage or FlatGeobuf layer ``regions`` in the scene's own
CRS and coordinates, for GIS (through ``pyogrio``). The sink keeps the map in memory, like
the per-cell GeoJSON, and writes the file when the map is complete.

>>> import numpy as np, nofc
>>> from nofc.placement import Placement
>>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
>>> scores = np.zeros((2, 3, 3)); scores[1] = 5; scores[1, 1, 1] = -5  # a ring of class 1
>>> found, unit = merge_regions(scores, Placement(geo, (4, 4)), exclude=[0])
>>> [(r.name, r.cells, r.area, len(r.polygon.interiors)) for r in found], unit
([('class 1', 8, 128.0, 1)], 'px²')
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NofcError, refuse_overwrite
from .base import FileSink, MapFacts, Output
from .geojson import check_threshold, class_names, colour, geojson_points, probabilities
from .memory import MemorySink

__all__ = ["RegionsOutput", "RegionsSink", "Region", "merge_regions"]

_DRIVERS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".geojson": "GeoJSON"}
_ROWS = 2 ** 20  # cells per block when the map is turned into probabilities


@dataclass(frozen=True)
class RegionsOutput(Output):
    """Merged regions per class (``.regions.geojson``, ``.gpkg``, ``.fgb``) of the cells
    whose top class probability reaches ``threshold``; classes in ``exclude`` (names or
    indices: a background) are left out."""

    path: str | os.PathLike
    threshold: float = 0.5
    exclude: tuple = ()
    metadata: dict | None = None  # kept with the map (``{"classes": [...]}`` names them)

    def __post_init__(self):
        check_threshold(self.threshold)
        suffix = Path(self.path).suffix.lower()
        if suffix not in _DRIVERS:
            raise NofcError(f"cannot write regions to {self.path}: use .regions.geojson "
                            f"(QuPath / RFC 7946), .gpkg (GeoPackage) or .fgb (FlatGeobuf)")
        exclude = self.exclude
        if isinstance(exclude, (str, int)):
            exclude = (exclude,)
        object.__setattr__(self, "exclude", tuple(exclude or ()))

    def check(self, *, force: bool = False) -> None:
        refuse_overwrite(self.path, force=force)

    def open(self, facts: MapFacts) -> "RegionsSink":
        return RegionsSink(self.path, facts.shape, facts.dtype, placement=facts.placement,
                           metadata=self.kept(facts), blocks=facts.blocks,
                           threshold=self.threshold, exclude=self.exclude)


@dataclass(frozen=True)
class Region:
    """One merged region: a shapely ``Polygon`` in level-0 pixels or world coordinates
    (exterior counter-clockwise), its class, area, cells and probabilities."""

    cls: int
    name: str
    polygon: object
    cells: int
    area: float
    mean: float
    max: float


def _classes(exclude, names: list[str]) -> set[int]:
    """The indices of the classes named or numbered in ``exclude``."""
    out = set()
    for e in exclude:
        if str(e) in names:
            out.add(names.index(str(e)))
        elif str(e).isdigit() and not isinstance(e, bool) and int(e) < len(names):
            out.add(int(e))  # a number, from Python or the command line
        else:
            raise NofcError(f"cannot leave out class {e!r}: the classes are "
                            + ", ".join(names) + f" (or their numbers 0..{len(names) - 1})")
    return out


def _geo():
    try:
        import shapely
        from rasterio import features
    except ImportError:
        raise NofcError("merged regions need rasterio and shapely: pip install 'nofc[geo]'"
                        ) from None
    return shapely, features


def _top(scores, threshold: float, left_out: set[int]):
    """``(label, prob)``: ``1 + k`` where class ``k`` is a cell's top class and reaches
    ``threshold`` (0 elsewhere, and for classes left out), and that probability; read in
    blocks of rows, so that the map is never in memory twice."""
    k, h, w = scores.shape
    label = np.zeros((h, w), np.int32)
    prob = np.zeros((h, w), np.float64)
    rows = max(1, _ROWS // max(1, k * w))
    for r in range(0, h, rows):
        probs, finite = probabilities(scores[:, r:r + rows])
        top, p = probs.argmax(0), probs.max(0)
        keep = finite & (p >= threshold) & ~np.isin(top, list(left_out))
        label[r:r + rows] = np.where(keep, top + 1, 0)
        prob[r:r + rows] = p
    return label, prob


def merge_regions(scores, placement, *, threshold: float = 0.5, exclude=(),
            names: list[str] | None = None) -> tuple[list[Region], str]:
    """The merged regions of a ``(K, h, w)`` map of class scores (see the module
    docstring) and the unit of their areas; ``placement`` says where the cells lie.
    Regions come class by class, each class's from the top left."""
    shapely, features = _geo()
    from affine import Affine

    names = class_names({"classes": names}, scores.shape[0])
    label, prob = _top(scores, check_threshold(threshold), _classes(exclude, names))
    shapes = list(features.shapes(label, mask=label > 0, connectivity=4,
                                  transform=Affine.identity()))  # in cells: exact
    shapes.sort(key=lambda s: (s[1], min(y for _, y in s[0]["coordinates"][0]),
                               min(x for x, _ in s[0]["coordinates"][0])))
    if not shapes:
        return [], placement.cell_area()[1]
    ids = features.rasterize(((g, n + 1) for n, (g, _) in enumerate(shapes)),
                             out_shape=label.shape, transform=Affine.identity(),
                             fill=0, dtype="int32").ravel()  # the region of each cell
    n = len(shapes) + 1
    cells = np.bincount(ids, minlength=n)[1:]
    mean = np.bincount(ids, weights=prob.ravel(), minlength=n)[1:] / cells
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, ids, prob.ravel())
    a, b, c, d, e, f = placement.cell_transform()
    polys = shapely.transform([shapely.geometry.shape(g) for g, _ in shapes],
                              lambda xy: np.stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                   d * xy[:, 0] + e * xy[:, 1] + f], -1))
    polys = shapely.orient_polygons(polys)
    area, unit = placement.cell_area()
    return [Region(int(v) - 1, names[int(v) - 1], p, int(m), float(m * area), float(mu),
                   float(mx))
            for (_, v), p, m, mu, mx in zip(shapes, polys, cells, mean, peak[1:])], unit


class RegionsSink(FileSink):
    """Merged regions per class, written when the map is complete (see the module
    docstring)."""

    def __init__(self, path, shape, dtype, *, placement, threshold: float = 0.5,
                 exclude=(), metadata=None, blocks=None):
        super().__init__(path, shape, dtype, blocks)
        self.placement, self.threshold = placement, check_threshold(threshold)
        self.names = class_names(metadata, self.shape[0])
        self.exclude = sorted(_classes(exclude, self.names))  # refused before any work
        self.driver = _DRIVERS[self.path.suffix.lower()]
        if self.driver != "GeoJSON":
            _pyogrio()
        _geo()
        self.map = MemorySink(shape, dtype, blocks)

    def _cells(self, tile, block):
        self.map._cells(tile, block)

    def finalize(self) -> np.ndarray:
        scores = self.map.finalize()
        found, unit = merge_regions(scores, self.placement, threshold=self.threshold,
                              exclude=self.exclude, names=self.names)
        if self.driver == "GeoJSON":
            text = json.dumps(self._geojson(found, unit))
            self._op(lambda: self.tmp.write_text(text, encoding="utf-8"), "the regions")
        else:
            self._op(lambda: self._layer(found, unit), "the regions")
        self._publish()
        return scores

    def _geojson(self, found: list[Region], unit: str) -> dict:
        """QuPath annotations (a slide) or RFC 7946 features (a scene)."""
        shapely, _ = _geo()
        to, facts = geojson_points(self.placement)
        polys = shapely.orient_polygons(shapely.transform(
            [r.polygon for r in found], lambda xy: np.stack(to(xy[:, 0], xy[:, 1]), -1)))
        facts = {**facts, "threshold": self.threshold, "area unit": unit,
                 "left out": [self.names[k] for k in self.exclude]}
        slide = self.placement.transform is None
        feats = []
        for r, p in zip(found, polys):
            if slide:
                props = {"objectType": "annotation",
                         "classification": {"name": r.name, "color": colour(r.cls, len(self.names))},
                         "measurements": {f"Area {unit.replace('²', '^2')}": r.area,
                                          "Mean probability": round(r.mean, 6),
                                          "Max probability": round(r.max, 6),
                                          "Cells": r.cells}}
            else:
                props = dict(zip(_fields(unit), _row(r)))
            feats.append({"type": "Feature", "geometry": shapely.geometry.mapping(p),
                          "properties": props})
        doc = {"type": "FeatureCollection", "nofc": facts}
        if feats and not slide:
            doc["bbox"] = [float(v) for v in shapely.total_bounds(polys)]
        doc["features"] = feats
        return doc

    def _layer(self, found: list[Region], unit: str) -> None:
        """A GeoPackage or FlatGeobuf layer ``regions``, in the map's own coordinates."""
        shapely, _ = _geo()
        rows = [_row(r) for r in found]
        cols = [np.array([row[i] for row in rows],
                         dtype=object if i == 0 else np.int64 if i in (1, 5) else np.float64)
                for i in range(6)]
        with warnings.catch_warnings():  # a slide has no CRS: its level-0 pixels
            warnings.filterwarnings("ignore", message=".*'crs' was not provided")
            _pyogrio().write(str(self.tmp), shapely.to_wkb([r.polygon for r in found]), cols,
                             _fields(unit), layer="regions", driver=self.driver,
                             geometry_type="Polygon", crs=self.placement.crs)


def _fields(unit: str) -> list[str]:
    """Attribute names of a region in a GIS layer (the area's unit in its name)."""
    area = "area_" + unit.replace("µ", "u").replace("²", "2").replace(" ", "_")
    return ["class", "class_index", area, "mean_probability", "max_probability", "cells"]


def _row(r: Region) -> tuple:
    return (r.name, r.cls, r.area, round(r.mean, 6), round(r.max, 6), r.cells)


def _pyogrio():
    try:
        from pyogrio import raw
    except ImportError:
        raise NofcError("GeoPackage and FlatGeobuf output need pyogrio: pip install "
                        "'nofc[geo]'") from None
    return raw
