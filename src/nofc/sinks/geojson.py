"""QuPath detections: one GeoJSON feature per map cell whose top class is likely enough.

One QuPath detection per map cell whose top class probability reaches ``threshold``, a
square polygon (the cell: ``step`` wide, centred on its window: ``Placement.cell_transform``)
with its class as the classification and every class probability as a measurement named
after the class. It also keeps the map (in memory) for the caller. Written through a
temporary file, renamed into place by ``finalize``.

Coordinates (:func:`geojson_points`): level-0 pixels for a slide or a picture (QuPath's
coordinates); for a scene with a CRS, longitude and latitude in WGS84 as RFC 7946 asks
(reprojected; the scene's CRS is written next to them in the foreign member ``"nofc"``,
and a ``.gpkg`` or ``.fgb`` of merged regions keeps the CRS's own coordinates); a scene
without a CRS, its map units. Exterior rings are counter-clockwise (:func:`ccw_rings`),
and there is no ``crs`` member (RFC 7946 removed it).

The helpers here (:func:`probabilities`, :func:`class_names`, :func:`colour`,
:func:`geojson_points`) are shared with the merged regions (``nofc.sinks.regions``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import NofcError, refuse_overwrite
from ..scores import class_colour
from ..scores import probabilities as class_probabilities
from .base import FileSink, MapFacts, Output
from .memory import MemorySink

__all__ = ["GeoJsonSink", "GeoJsonOutput"]


def check_threshold(threshold) -> float:
    """A probability threshold in [0, 1], or one NofcError.

    >>> check_threshold(0.8)
    0.8
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise NofcError(f"threshold must be a probability in [0, 1], got {threshold}")
    return float(threshold)


@dataclass(frozen=True)
class GeoJsonOutput(Output):
    """QuPath detections (``.geojson``) for the cells whose top class probability reaches
    ``threshold``."""

    path: str | os.PathLike
    threshold: float = 0.5
    metadata: dict | None = None  # kept with the map (``{"classes": [...]}`` names bands)

    def __post_init__(self):
        check_threshold(self.threshold)

    def check(self, *, force: bool = False) -> None:
        refuse_overwrite(self.path, force=force)

    def open(self, facts: MapFacts) -> "GeoJsonSink":
        return GeoJsonSink(self.path, facts.shape, facts.dtype, placement=facts.placement,
                           metadata=self.kept(facts), blocks=facts.blocks,
                           threshold=self.threshold)


def probabilities(scores) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, finite)`` of a ``(K, ...)`` block of map values: the class probabilities
    (``nofc.scores.probabilities``, the one rule), and where they exist (a NaN cell was
    masked out or saw NaN pixels).

    >>> p, ok = probabilities(np.array([[0.0, np.nan], [np.log(3), 0.0]]))
    >>> p[:, 0].round(2).tolist(), ok.tolist()
    ([0.25, 0.75], [True, False])
    """
    probs = class_probabilities(scores)
    return probs, np.isfinite(probs).all(0)


def class_names(metadata: dict | None, k: int) -> list[str]:
    """The names of ``k`` classes: ``metadata["classes"]``, else ``class i``.

    >>> class_names({"classes": ["tumour"]}, 2)
    ['tumour', 'class 1']
    """
    names = list((metadata or {}).get("classes") or [])
    return [str(names[i]) if i < len(names) else f"class {i}" for i in range(k)]


def colour(k: int, classes: int) -> list[int]:
    """The RGB colour of class ``k`` of ``classes`` (QuPath's classification colour;
    the rule: :func:`nofc.scores.class_colour`).

    >>> colour(0, 2), colour(1, 12)
    ([31, 119, 180], [174, 199, 232])
    """
    return list(class_colour(k, classes))


def geojson_points(placement):
    """``(to, facts)``: ``to(x, y)`` maps arrays of level-0 / world coordinates to a
    GeoJSON's (longitude, latitude in WGS84 for a scene whose CRS is another, else
    unchanged), ``facts`` says what they are (the ``"nofc"`` foreign member).

    >>> to, facts = geojson_points(None)
    >>> to(np.array([1.0]), np.array([2.0])), facts
    ((array([1.]), array([2.])), {'coordinates': 'level-0 slide pixels (QuPath)'})
    """
    same = lambda x, y: (x, y)  # noqa: E731
    if placement is None or placement.transform is None:
        return same, {"coordinates": "level-0 slide pixels (QuPath)"}
    if not placement.crs:
        return same, {"coordinates": "the scene's map units (it has no CRS)"}
    from rasterio.crs import CRS
    from rasterio.warp import transform

    crs = CRS.from_user_input(placement.crs)
    facts = {"coordinates": "WGS84 longitude, latitude (RFC 7946)",
             "crs": f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else crs.to_wkt()}
    if crs == CRS.from_epsg(4326):
        return same, facts
    facts["coordinates"] += f", reprojected from {facts['crs']}"

    def to(x, y):
        shape = np.shape(x)
        lon, lat = transform(crs, "EPSG:4326", np.ravel(x), np.ravel(y))
        return np.reshape(lon, shape), np.reshape(lat, shape)

    return to, facts


def ccw_rings(rings: np.ndarray) -> np.ndarray:
    """``(n, m, 2)`` closed rings, each reversed where it turns clockwise (negative
    signed area with y up), so that all are counter-clockwise (RFC 7946's exterior rings).

    >>> ccw_rings(np.array([[[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]]))[0].tolist()
    [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
    """
    x, y = rings[..., 0], rings[..., 1]
    area = (x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]).sum(1)
    return np.where((area < 0)[:, None, None], rings[:, ::-1], rings)


class GeoJsonSink(FileSink):
    """QuPath detections for the cells above ``threshold`` (see the module docstring)."""

    def __init__(self, path, shape, dtype, *, placement, threshold: float = 0.5,
                 metadata=None, blocks=None):
        super().__init__(path, shape, dtype, blocks)
        self.threshold, self.placement = float(threshold), placement
        self.names = class_names(metadata, self.shape[0])
        self.map = MemorySink(shape, dtype, blocks)
        self.features = 0
        self.to, facts = geojson_points(placement)
        self.file = self._op(lambda: open(self.tmp, "w", encoding="utf-8"), "the header")
        self.file.write('{"type": "FeatureCollection", "nofc": ' + json.dumps(facts)
                        + ', "features": [\n')

    def _cells(self, tile, block):
        self.map._cells(tile, block)
        a, b, c, d = tile.out
        text = self._features(block, a, c)
        if text:
            self._op(lambda: self.file.write((",\n" if self.features else "") + text),
                     f"block {tile.index}")
            self.features += text.count('"Feature"')

    def _features(self, block: np.ndarray, a: int, c: int) -> str:
        """Features of the cells of ``block`` (map rows from ``a``, columns from ``c``)."""
        probs, finite = probabilities(block)
        top = probs.argmax(0)
        keep = finite & (probs.max(0) >= self.threshold)
        i, j = np.nonzero(keep)
        if not len(i):
            return ""
        col, row = (c + j)[:, None], (a + i)[:, None]
        cx = col + np.array([0, 1, 1, 0, 0])  # (n, 5) the cell's corners
        cy = row + np.array([0, 0, 1, 1, 0])
        a0, b0, c0, d0, e0, f0 = self.placement.cell_transform()
        rings = ccw_rings(np.stack(self.to(a0 * cx + b0 * cy + c0, d0 * cx + e0 * cy + f0),
                                   -1))
        out = []
        for n, (r, q) in enumerate(zip(i, j)):
            k = int(top[r, q])
            out.append(json.dumps({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [rings[n].tolist()]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": self.names[k], "color": colour(k, len(self.names))},
                    "measurements": {**{name: round(float(p), 6) for name, p in
                                        zip(self.names, probs[:, r, q])},
                                     "map row": int(row[n, 0]), "map column": int(col[n, 0])},
                },
            }))
        return ",\n".join(out)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def finalize(self) -> np.ndarray:
        def end():
            with open(self.tmp, "a", encoding="utf-8") as f:
                f.write("\n]}\n")

        self._op(end, "the end")
        self._publish()
        return self.map.finalize()
