"""The map as a tiled, compressed GeoTIFF with overviews, for QGIS and GDAL.

A ``(K, h, w)`` map of class scores, band ``k`` named after class ``k``, NaN as nodata,
with overviews (a pyramid). Its affine is the map's
:meth:`nofc.placement.Placement.cell_transform`: world coordinates and the CRS of a raster
input, level-0 slide pixels for a slide or a picture (no CRS). Written block by block into
a temporary file next to the output, renamed into place by ``finalize``; a run that stops
leaves no output behind (and nothing to resume: use a ``.zarr`` store for that).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import NofcError, refuse_overwrite
from .base import FileSink, MapFacts, Output

__all__ = ["GeoTiffSink", "GeoTiffOutput", "RasterMap"]

_BLOCK = 256  # GeoTIFF tile side in cells


@dataclass(frozen=True)
class GeoTiffOutput(Output):
    """A GeoTIFF (``.tif``/``.tiff``)."""

    path: str | os.PathLike
    metadata: dict | None = None  # kept with the map (``{"classes": [...]}`` names bands)

    def check(self, *, force: bool = False) -> None:
        refuse_overwrite(self.path, force=force)

    def open(self, facts: MapFacts) -> "GeoTiffSink":
        return GeoTiffSink(self.path, facts.shape, facts.dtype, placement=facts.placement,
                           metadata=self.kept(facts), blocks=facts.blocks)


class GeoTiffSink(FileSink):
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
