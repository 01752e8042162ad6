"""QuPath detections: one GeoJSON feature per map cell whose top class is likely enough.

One QuPath detection per map cell whose top class probability reaches ``threshold``, a
square polygon (the cell: ``step`` wide, centred on its window) in level-0 slide pixels
(QuPath's coordinates) or world coordinates, with its class as the classification and
every class probability as a measurement named after the class. It also keeps the map
(in memory) for the caller. Written through a temporary file, renamed into place by
``finalize``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import NofcError, refuse_overwrite
from .base import FileSink, MapFacts, Output
from .memory import MemorySink

__all__ = ["GeoJsonSink", "GeoJsonOutput"]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass(frozen=True)
class GeoJsonOutput(Output):
    """QuPath detections (``.geojson``) for the cells whose top class probability reaches
    ``threshold``."""

    path: str | os.PathLike
    threshold: float = 0.5
    metadata: dict | None = None  # kept with the map (``{"classes": [...]}`` names bands)

    def __post_init__(self):
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise NofcError(f"threshold must be a probability in [0, 1], got {self.threshold}")

    def check(self, *, force: bool = False) -> None:
        refuse_overwrite(self.path, force=force)

    def open(self, facts: MapFacts) -> "GeoJsonSink":
        return GeoJsonSink(self.path, facts.shape, facts.dtype, placement=facts.placement,
                           metadata=self.kept(facts), blocks=facts.blocks,
                           threshold=self.threshold)


class GeoJsonSink(FileSink):
    """QuPath detections for the cells above ``threshold`` (see the module docstring)."""

    def __init__(self, path, shape, dtype, *, placement, threshold: float = 0.5,
                 metadata=None, blocks=None):
        super().__init__(path, shape, dtype, blocks)
        self.threshold, self.placement = float(threshold), placement
        names = list((metadata or {}).get("classes") or [])
        self.names = [str(names[i]) if i < len(names) else f"class {i}"
                      for i in range(self.shape[0])]
        self.map = MemorySink(shape, dtype, blocks)
        self.features = 0
        self.file = self._op(lambda: open(self.tmp, "w", encoding="utf-8"), "the header")
        crs = _crs_member(placement.crs)
        self.file.write('{"type": "FeatureCollection", ' + (f'"crs": {json.dumps(crs)}, '
                                                            if crs else "")
                        + '"features": [\n')

    def _cells(self, tile, block):
        self.map._cells(tile, block)
        a, b, c, d = tile.out
        text = self._features(np.asarray(block, np.float64), a, c)
        if text:
            self._op(lambda: self.file.write((",\n" if self.features else "") + text),
                     f"block {tile.index}")
            self.features += text.count('"Feature"')

    def _features(self, block: np.ndarray, a: int, c: int) -> str:
        """Features of the cells of ``block`` (map rows from ``a``, columns from ``c``)."""
        finite = np.isfinite(block).all(0)  # NaN cells: masked out, or saw NaN pixels
        z = np.where(finite, block, 0.0)
        z = z - z.max(0, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(0, keepdims=True)  # softmax over the classes
        top = probs.argmax(0)
        keep = finite & (probs.max(0) >= self.threshold)
        a0, b0, c0, d0, e0, f0 = self.placement.cell_transform()
        out = []
        for i, j in zip(*np.nonzero(keep)):
            col, row = c + j, a + i
            ring = [(col, row), (col + 1, row), (col + 1, row + 1), (col, row + 1), (col, row)]
            coords = [[a0 * x + b0 * y + c0, d0 * x + e0 * y + f0] for x, y in ring]
            k = int(top[i, j])
            out.append(json.dumps({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [coords]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": self.names[k],
                                       "color": list(_PALETTE[k % len(_PALETTE)])},
                    "measurements": {**{n: round(float(p), 6) for n, p in
                                        zip(self.names, probs[:, i, j])},
                                     "map row": int(row), "map column": int(col)},
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


def _crs_member(wkt: str | None) -> dict | None:
    """The (2008) GeoJSON ``crs`` member QGIS reads, for a CRS with an EPSG code."""
    if not wkt:
        return None
    codes = re.findall(r'AUTHORITY\["EPSG","(\d+)"\]', wkt)
    if not codes:
        return None
    return {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{codes[-1]}"}}
