"""Maps out for the field's own tools: GeoTIFF for QGIS, GeoJSON for QuPath.

Both are :class:`nofc.sinks.Sink` s: tiling hands them blocks as they finish, and they
write them block by block into a temporary file next to the output, renamed into place
by ``finalize``; a run that stops leaves no output behind (and nothing to resume: use a
``.zarr`` store for that).

* :class:`GeoTiffSink` (``.tif``): a tiled, deflate-compressed GeoTIFF of the ``K`` class
  maps (band ``k`` named after class ``k``), NaN as nodata, with overviews (a pyramid).
  Its affine is the map's :meth:`nofc.placement.Placement.cell_transform`: world
  coordinates and the CRS of a raster input, level-0 slide pixels for a slide or a
  picture (no CRS).
* :class:`GeoJsonSink` (``.geojson``): one QuPath detection per map cell whose top class
  probability reaches ``threshold``, a square polygon (the cell: ``step`` wide, centred on
  its window) in level-0 slide pixels (QuPath's coordinates) or world coordinates, with
  its class as the classification and every class probability as a measurement named
  after the class. It also keeps the map (in memory) for the caller.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import NofcError, first_line
from .sinks import MemorySink, Sink

__all__ = ["GeoTiffSink", "GeoJsonSink", "RasterMap"]

_BLOCK = 256  # GeoTIFF tile side in cells
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _temporary(path: Path) -> Path:
    """Where an output is written until it is complete (same folder: rename is atomic)."""
    if not path.parent.is_dir():
        raise NofcError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise NofcError(f"{path} is a folder; choose another output")
    return path.with_name(f".{path.name}.nofc-partial{path.suffix}")


class _FileSink(Sink):
    """A sink writing one file through a temporary one; removed when the run fails."""

    def __init__(self, path, shape, dtype, blocks=None):
        super().__init__(blocks)
        self.path = Path(path)
        self.tmp = _temporary(self.path)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is not None:
            self._abort()

    def _abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def _op(self, op, what: str):
        try:
            return op()
        except OSError as exc:
            self._abort()
            raise NofcError(f"cannot write {what} to {self.path}: "
                            f"{exc.strerror or first_line(exc)}; nothing was kept") from None

    def _publish(self) -> None:
        self._op(lambda: os.replace(self.tmp, self.path), "the finished file")


class GeoTiffSink(_FileSink):
    """The map as a tiled, compressed GeoTIFF with overviews (see the module docstring)."""

    def __init__(self, path, shape, dtype, *, placement, metadata=None, blocks=None):
        super().__init__(path, shape, dtype, blocks)
        rasterio = _rasterio()
        from affine import Affine

        k, h, w = self.shape
        profile = {"driver": "GTiff", "width": w, "height": h, "count": k,
                   "dtype": self.dtype.name, "nodata": float("nan"), "compress": "deflate",
                   "predictor": 3, "BIGTIFF": "IF_SAFER"}
        if h >= _BLOCK and w >= _BLOCK:  # a tile smaller than the image, else strips
            profile.update(tiled=True, blockxsize=_BLOCK, blockysize=_BLOCK)
        profile["transform"] = Affine(*placement.cell_transform())
        if placement.crs:
            profile["crs"] = placement.crs
        self.placement, self.metadata = placement, metadata or {}
        self.dst = self._op(lambda: rasterio.open(self.tmp, "w", **profile), "the header")
        names = self.metadata.get("classes") or []
        for i in range(k):
            self.dst.set_band_description(i + 1, str(names[i]) if i < len(names) else
                                          f"class {i}")
        self.dst.update_tags(nofc=json.dumps({**self.metadata,
                                              "placement": placement.as_dict()},
                                             default=str))

    def _cells(self, tile, block):
        from rasterio.windows import Window

        a, b, c, d = tile.out
        self._op(lambda: self.dst.write(np.asarray(block, self.dtype),
                                        window=Window(c, a, d - c, b - a)),
                 f"block {tile.index}")

    def close(self) -> None:
        if not self.dst.closed:
            self.dst.close()

    def finalize(self) -> "RasterMap":
        """Overviews, then the file moved into place; the map, read lazily."""
        from rasterio.enums import Resampling

        k, h, w = self.shape
        factors = [2 ** i for i in range(1, 12) if max(h, w) // 2 ** i >= _BLOCK]
        rasterio = _rasterio()

        def build():
            with rasterio.open(self.tmp, "r+") as dst:
                dst.build_overviews(factors, Resampling.average)

        if factors:
            self._op(build, "the overviews")
        self._publish()
        return RasterMap(self.path)


class RasterMap:
    """A ``(K, h, w)`` map in a raster file, read by window (``map[:, rows, cols]``)."""

    def __init__(self, path):
        self.path = str(path)
        with _rasterio().open(self.path) as ds:
            self.shape = (ds.count, ds.height, ds.width)
            self.dtype = np.dtype(ds.dtypes[0])

    def __getitem__(self, key) -> np.ndarray:
        from rasterio.windows import Window

        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        (k0, k1, ks), (y0, y1, sy), (x0, x1, sx) = (s.indices(n) for s, n in
                                                    zip(key, self.shape))
        with _rasterio().open(self.path) as ds:
            out = ds.read(list(range(k0 + 1, k1 + 1)), window=Window(x0, y0, x1 - x0, y1 - y0))
        return out[::ks, ::sy, ::sx]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)


def _rasterio():
    try:
        import rasterio
    except ImportError:
        raise NofcError("GeoTIFF output needs rasterio: pip install 'nofc[geo]'") from None
    return rasterio


class GeoJsonSink(_FileSink):
    """QuPath detections for the cells above ``threshold`` (see the module docstring)."""

    def __init__(self, path, shape, dtype, *, placement, threshold: float = 0.5,
                 metadata=None, blocks=None):
        super().__init__(path, shape, dtype, blocks)
        if not 0.0 <= float(threshold) <= 1.0:
            raise NofcError(f"threshold must be a probability in [0, 1], got {threshold}")
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


def open_geo_sink(out, shape, dtype, *, placement, metadata=None, blocks=None,
                  threshold: float = 0.5):
    """The sink for an ``out`` ending in ``.tif``/``.tiff`` or ``.geojson``; else None."""
    suffix = Path(out).suffix.lower()
    if suffix in (".tif", ".tiff"):
        return GeoTiffSink(out, shape, dtype, placement=placement, metadata=metadata,
                           blocks=blocks)
    if suffix == ".geojson":
        return GeoJsonSink(out, shape, dtype, placement=placement, metadata=metadata,
                           blocks=blocks, threshold=threshold)
    return None
