"""The map as Cloud Optimized GeoTIFFs, for QGIS, GDAL, QuPath and cloud readers.

Two files, both COGs (tiled, deflate, overviews stored before the full-resolution image,
as GDAL's COG driver lays them out), both with the map's affine
(:meth:`nofc.placement.Placement.cell_transform`: world coordinates and the CRS of a
raster input, level-0 slide pixels for a slide or a picture, which have no CRS):

* ``map.tif``: one float32 band per class kept (``classes``, default all), named after the
  class, NaN as nodata. ``values="probs"`` (the default) holds class probabilities
  (:func:`nofc.scores.probabilities`: the numbers the viewer and the GeoJSON show);
  ``values="logits"`` the network's raw outputs (a zarr store always keeps those).
* ``map.classes.tif`` (``class_band=True``): the top class of every cell over all classes
  (one band, 8-bit, 255 as nodata; 16-bit above 255 classes), with a colour table (class
  ``k`` gets :func:`nofc.scores.class_colour`) and the class names as band metadata
  (``CLASS_k``); QGIS shows it as a paletted layer. A colour table needs a file of its own
  (TIFF keeps palettes for single-band images only).

A slide's map records its cell size in microns: TIFF resolution tags in pixels per
centimetre (``XResolution = 10000 / microns``, ``ResolutionUnit`` centimetre: what
OpenSlide, Bio-Formats and large_image read) and ``nofc`` metadata. Blocks are written
as they finish to temporary tiled files next to the output; ``finalize`` copies them with
the COG driver and renames the results into place; a run that stops leaves no output
behind (and nothing to resume: use a ``.zarr`` store for that).

>>> import numpy as np, rasterio, tempfile, os, nofc
>>> from types import SimpleNamespace as Block
>>> from nofc.placement import Placement
>>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
>>> path = os.path.join(tempfile.mkdtemp(), "map.tif")
>>> out = GeoTiffOutput(path, metadata={"classes": list("abcdefghij")}, classes=["b", 3])
>>> facts = MapFacts((10, 20, 30), np.float32, placement=Placement(geo, (4, 4)))
>>> with out.open(facts) as sink:
...     sink.aggregate(Block(index=(0, 0), out=(0, 20, 0, 30)), np.zeros((10, 20, 30)))
...     written = sink.finalize()
>>> written.shape, written.values, written.classes, np.asarray(written)[:, 0, 0].tolist()
((2, 20, 30), 'probs', [1, 3], [0.10000000149011612, 0.10000000149011612])
>>> with rasterio.open(out.class_path) as ds:
...     ds.colormap(1)[1], ds.tags(1)["CLASS_1"], ds.read(1)[0, 0]
((255, 127, 14, 255), 'b', np.uint8(0))
"""

from __future__ import annotations

import json
import os
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np

from ..errors import NofcError, refuse_overwrite
from ..scores import class_colour, probabilities, top_class
from .base import FileSink, MapFacts, Output, temporary

__all__ = ["GeoTiffSink", "GeoTiffOutput", "RasterMap"]

_BLOCK = 256  # largest COG tile side in cells
_VALUES = ("probs", "logits")


@dataclass(frozen=True)
class GeoTiffOutput(Output):
    """Cloud Optimized GeoTIFFs (``.tif``/``.tiff``) of the map (see the module docstring).

    Attributes:
        values: ``"probs"`` (class probabilities, the default) or ``"logits"``.
        classes: the classes to keep as bands, by index or name (default: all).
        class_band: also write the top class, with a colour table, to :attr:`class_path`.
    """

    path: str | os.PathLike
    metadata: dict | None = None  # kept with the map (``{"classes": [...]}`` names bands)
    _: KW_ONLY
    values: str = "probs"
    classes: tuple | None = None
    class_band: bool = True

    def __post_init__(self):
        if self.values not in _VALUES:
            raise NofcError(f"--values must be probs or logits, got {self.values!r}")
        if self.classes is not None:
            kept = (self.classes,) if isinstance(self.classes, (str, int)) else \
                tuple(self.classes)
            if not kept:
                raise NofcError("--classes is empty; name at least one class (or leave it "
                                "out for all)")
            object.__setattr__(self, "classes", kept)

    @property
    def class_path(self) -> Path:
        """Where the class band goes: ``map.tif`` -> ``map.classes.tif``."""
        p = Path(self.path)
        return p.with_name(f"{p.stem}.classes{p.suffix}")

    def check(self, *, force: bool = False) -> None:
        refuse_overwrite(self.path, force=force)
        if self.class_band:
            refuse_overwrite(self.class_path, force=force)

    def bands(self, k: int) -> list[int]:
        """The class of each value band of a map of ``k`` classes (``classes`` by name
        are looked up in ``metadata["classes"]``); a class it lacks is one NofcError.

        >>> GeoTiffOutput("m.tif", metadata={"classes": ["a", "b", "c"]},
        ...               classes=("c", 0)).bands(3)
        [2, 0]
        """
        return _kept_classes(self.classes, _names(self.metadata, k)) or list(range(k))

    def open(self, facts: MapFacts) -> "GeoTiffSink":
        metadata = self.kept(facts)
        keep = _kept_classes(self.classes, _names(metadata, facts.shape[0]))
        return GeoTiffSink(self.path, facts.shape, facts.dtype, placement=facts.placement,
                           metadata=metadata, blocks=facts.blocks, values=self.values,
                           keep=keep, class_path=self.class_path if self.class_band else None)


class GeoTiffSink(FileSink):
    """The map as Cloud Optimized GeoTIFFs (see the module docstring)."""

    def __init__(self, path, shape, dtype, *, placement, metadata=None, blocks=None,
                 values: str = "probs", keep=None, class_path=None):
        super().__init__(path, shape, dtype, blocks)
        k, h, w = self.shape
        self.values, self.placement, self.metadata = values, placement, metadata or {}
        self.keep = list(range(k)) if keep is None else [int(i) for i in keep]
        self.names = _names(self.metadata, k)
        self.class_path = None if class_path is None else Path(class_path)
        # blocks go to tiled "stage" files; finalize copies them into COGs at self.tmp
        self.stage = self.tmp.with_name(f"{self.tmp.stem}-blocks{self.tmp.suffix}")
        self.class_tmp = None if class_path is None else temporary(self.class_path)
        self.class_stage = None if class_path is None else \
            self.class_tmp.with_name(f"{self.class_tmp.stem}-blocks{self.class_tmp.suffix}")
        self.nodata = 255 if k <= 255 else 65535
        tags = self._tags()
        dtype = self.dtype.name if values == "logits" else "float32"
        self.dst = self._op(lambda: self._create(self.stage, len(self.keep), dtype,
                                                 float("nan")), "the header")
        self.dst.update_tags(**tags)
        for band, i in enumerate(self.keep, 1):
            self.dst.set_band_description(band, self.names[i])
        self.cls = None
        if self.class_stage is not None:
            self.cls = self._op(lambda: self._create(
                self.class_stage, 1, np.dtype(np.uint8 if self.nodata == 255 else
                                              np.uint16).name, self.nodata), "the class band")
            self.cls.update_tags(**{**tags, "nofc": json.dumps(
                {**json.loads(tags["nofc"]), "values": "top class"}, default=str)})
            self.cls.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(self.names)})
            self.cls.set_band_description(1, "top class")
            self.cls.write_colormap(1, {i: (*class_colour(i, k), 255) for i in range(k)})

    def _create(self, path, count: int, dtype: str, nodata):
        from affine import Affine

        k, h, w = self.shape
        profile = {"driver": "GTiff", "width": w, "height": h, "count": count,
                   "dtype": dtype, "nodata": nodata, "compress": "deflate", "zlevel": 1,
                   "tiled": True, "blockxsize": 256, "blockysize": 256, "BIGTIFF": "IF_SAFER",
                   "transform": Affine(*self.placement.cell_transform())}
        if self.placement.crs:
            profile["crs"] = self.placement.crs
        return _rasterio().open(path, "w", **profile)

    def _tags(self) -> dict:
        """GDAL metadata: what nofc knows of the map, and a slide's cell size as TIFF
        resolution tags (pixels per centimetre)."""
        kept = {**self.metadata, "placement": self.placement.as_dict(),
                "values": self.values, "classes_kept": self.keep,
                "class_names": self.names}
        tags = {"nofc": json.dumps(kept, default=str)}
        microns = self.placement.cell_microns() if self.placement.crs is None else None
        if microns is not None:
            tags.update(TIFFTAG_YRESOLUTION=f"{10000 / microns[0]:.10g}",
                        TIFFTAG_XRESOLUTION=f"{10000 / microns[1]:.10g}",
                        TIFFTAG_RESOLUTIONUNIT="3")
        return tags

    def _cells(self, tile, block):
        from rasterio.windows import Window

        a, b, c, d = tile.out
        window = Window(c, a, d - c, b - a)
        block = np.asarray(block)  # (K, rows, cols) logits
        values = probabilities(block) if self.values == "probs" else block
        self._op(lambda: self.dst.write(values[self.keep], window=window),
                 f"block {tile.index}")
        if self.cls is not None:
            top = top_class(block, nodata=self.nodata)
            self._op(lambda: self.cls.write(top[None], window=window), f"block {tile.index}")

    def close(self) -> None:
        for ds in (self.dst, self.cls):
            if ds is not None and not ds.closed:
                ds.close()

    def _abort(self) -> None:
        for p in (self.tmp, self.stage, self.class_tmp, self.class_stage):
            if p is not None:
                p.unlink(missing_ok=True)

    def finalize(self) -> "RasterMap":
        """The COGs made from the blocks (overviews first), moved into place; the map,
        read lazily."""
        self.close()
        try:  # (GDAL's own errors are not all OSErrors: no temporary is left either way)
            self._op(lambda: _cog(self.stage, self.tmp, self.shape[1:], "AVERAGE"), "the COG")
            if self.class_stage is not None:
                self._op(lambda: _cog(self.class_stage, self.class_tmp, self.shape[1:],
                                      "MODE"), "the class band's COG")
                self._op(lambda: os.replace(self.class_tmp, self.class_path),
                         "the class band")
            self._publish()
        except BaseException:
            self._abort()
            raise
        for p in (self.stage, self.class_stage):
            if p is not None:
                p.unlink(missing_ok=True)
        return RasterMap(self.path)


def _cog(stage: Path, out: Path, hw, resampling: str) -> None:
    """Copy ``stage`` to a COG at ``out``: tiles of 256 cells (128 for a map up to 512
    cells across), overviews by ``resampling`` down to one tile, and at least one."""
    side = max(hw)
    block = _BLOCK if side > 2 * _BLOCK else _BLOCK // 2  # GDAL's COG driver: >= 128
    options = {"COMPRESS": "DEFLATE", "BLOCKSIZE": block, "OVERVIEW_RESAMPLING": resampling,
               "BIGTIFF": "IF_SAFER"}
    if side <= block:  # one tile: GDAL would make no overview
        options["OVERVIEW_COUNT"] = 1
    if resampling == "AVERAGE":
        options["PREDICTOR"] = "YES"
    import rasterio.shutil

    rasterio.shutil.copy(str(stage), str(out), driver="COG", **options)


def _names(metadata: dict, k: int) -> list[str]:
    """The name of each of the ``k`` classes: the metadata's ``classes``, else ``class i``."""
    names = list((metadata or {}).get("classes") or [])
    return [str(names[i]) if i < len(names) else f"class {i}" for i in range(k)]


def _kept_classes(classes, names: list[str]) -> list[int] | None:
    """The indices of ``classes`` (indices or names) among ``names``; None for all."""
    if classes is None:
        return None
    keep = []
    for c in classes:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and \
                0 <= c < len(names):
            i = int(c)
        elif isinstance(c, str) and c in names:
            i = names.index(c)
        elif isinstance(c, str) and c.strip().isdigit() and int(c) < len(names):
            i = int(c)
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise NofcError(f"--classes: {c!r} is not one of the map's {len(names)} classes; "
                            f"give indices 0..{len(names) - 1} or names ({shown})")
        if i in keep:
            raise NofcError(f"--classes names class {names[i]!r} ({i}) twice")
        keep.append(i)
    return keep


class RasterMap:
    """A ``(K, h, w)`` map in a raster file, read by window (``map[:, rows, cols]``).

    Attributes:
        values: what the bands hold, ``"probs"`` or ``"logits"`` (a file nofc did not
            write: ``"logits"``).
        classes: the class index of each band.
    """

    def __init__(self, path):
        self.path = str(path)
        with _rasterio().open(self.path) as ds:
            self.shape = (ds.count, ds.height, ds.width)
            self.dtype = np.dtype(ds.dtypes[0])
            try:
                kept = json.loads(ds.tags().get("nofc", "{}"))
            except ValueError:
                kept = {}
        self.values = kept.get("values", "logits")
        self.classes = list(kept.get("classes_kept", range(self.shape[0])))

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
