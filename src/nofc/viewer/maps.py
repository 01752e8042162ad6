"""The maps ``nofc view`` opens: a zarr store or a GeoTIFF, and where their cells lie.

Either file becomes a :class:`MapFile`: the ``(K, h, w)`` class values read by block (raw
scores, shown as their softmax, unless a GeoTIFF's ``nofc`` tag says ``"values":
"probabilities"``), the class band when a GeoTIFF has one (a band described ``class``: not
a class), the class names (band descriptions, else the tag's ``classes``), and the affine
of the cells (``cells``) in the coordinates ``coordinates`` names:

* ``"read pixels"``: the pixels the map was computed on (a zarr store: its geometry and
  step; a slide's level or pixel size then scales them to level 0);
* ``"level-0 pixels"``: a GeoTIFF of a slide or a picture (its transform, no CRS);
* ``"world"``: a GeoTIFF of a raster (its transform and CRS).
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import NofcError
from ..placement import Placement
from ..windows import parse_step
from .tiles import check_square_step

__all__ = ["MapFile", "open_map", "CLASS_BAND"]

CLASS_BAND = "class"  # a GeoTIFF band with this description holds each cell's class
MAP_SUFFIXES = (".tif", ".tiff")
_USAGE = "pass the zarr store or the GeoTIFF written by nofc heatmap --out"


@dataclass
class MapFile:
    """A map as the viewer reads it (see the module docstring)."""

    name: str
    scores: object  # (K, h, w): shape, chunks, [k, rows, cols]
    class_names: list[str]
    cells: tuple  # GDAL-order affine of the cells: x = a*col + c, y = e*row + f
    coordinates: str  # "read pixels", "level-0 pixels" or "world"
    values: str = "scores"  # or "probabilities" (shown as they are)
    class_band: object = None  # (1, h, w) class indices, or None (the argmax is shown)
    crs: str | None = None
    image: str | None = None  # the image path the map records
    image_record: dict = field(default_factory=dict)  # its metadata["image"]
    reading: dict = field(default_factory=dict)  # level / mpp / bands the map read
    image_shape: list | None = None  # (H, W) of the pixels read, when recorded
    geometry: dict | None = None  # offset, window, stride (a zarr store)
    created: str | None = None


def _fail_not_map(name, why: str):
    raise NofcError(f"{name} is not a nofc map ({why}); {_USAGE}")


def open_map(path) -> MapFile:
    """The map in ``path`` (a zarr store, or a GeoTIFF ``.tif``), or one line saying why not.

    >>> open_map("no/such.zarr")
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: no/such.zarr not found: pass the zarr store or the GeoTIFF written by nofc heatmap --out
    """
    name = str(path)
    p = Path(name)
    if not p.exists():
        raise NofcError(f"{name} not found: {_USAGE}")
    if p.is_file() and p.suffix.lower() in MAP_SUFFIXES:
        return _open_geotiff(name)
    return _open_zarr(name)


def _recorded_image(attrs: dict) -> tuple[str | None, dict]:
    """The image path a map records (``attrs["image"]`` or ``metadata["image"]``), and
    the record itself."""
    for where in (attrs, attrs.get("metadata") or {}):
        value = where.get("image")
        record = value if isinstance(value, dict) else {}
        if isinstance(value, dict):
            value = value.get("path")
        if isinstance(value, str) and value:
            return value, record
    return None, {}


def _names(names, k: int) -> list[str]:
    names = names or []
    return [str(names[i]) if i < len(names) and names[i] else f"class {i}" for i in range(k)]


def _open_zarr(name: str) -> MapFile:
    try:
        import zarr
    except ImportError:  # pragma: no cover - part of nofc[view]
        raise NofcError("nofc view needs zarr: pip install 'nofc[view]'") from None
    try:
        scores = zarr.open_array(name, mode="r")
    except Exception:  # noqa: BLE001 - any unreadable store is the same mistake
        _fail_not_map(name, "not a zarr array")
    attrs = dict(scores.attrs).get("nofc")
    if not isinstance(attrs, dict) or not {"arguments", "geometry"} <= set(attrs):
        _fail_not_map(name, "a zarr array without nofc's attributes")
    if scores.ndim != 3:
        _fail_not_map(name, f"an array of shape {scores.shape}, not (classes, h, w)")
    args, geo = attrs["arguments"], attrs["geometry"]
    step = check_square_step(parse_step(args.get("step") or geo["stride"]))
    # cell (i, j): the step-sized square centred on its window's centre (Placement)
    window = SimpleNamespace(offset=tuple(geo["offset"]), window=tuple(geo["window"]))
    cells = Placement(window, (step, step)).pixel_transform()
    image, record = _recorded_image(attrs)
    meta = attrs.get("metadata") or {}
    return MapFile(
        name=name, scores=scores, class_names=_names(meta.get("classes"), scores.shape[0]),
        cells=cells, coordinates="read pixels", image=image, image_record=record,
        reading={k: args[k] for k in ("level", "mpp", "bands") if args.get(k) is not None},
        image_shape=args.get("image_shape"), created=attrs.get("created"),
        geometry={"offset": list(geo["offset"]), "window": list(geo["window"]),
                  "stride": list(geo["stride"]), "step": step, "exact": geo.get("exact")})


class RasterBands:
    """Bands of a raster file as a ``(K, h, w)`` array read by window (``[k, rows, cols]``,
    steps taken from the full-resolution window, so every ``s``-th cell is exact)."""

    def __init__(self, path: str, bands: list[int], block: tuple[int, int]):
        self.path, self.bands = path, list(bands)
        self._local = threading.local()
        ds = self._ds()
        self.shape = (len(self.bands), ds.height, ds.width)
        self.dtype = np.dtype(ds.dtypes[self.bands[0] - 1])
        self.nodata = ds.nodata
        self.chunks = (len(self.bands), *(max(256, b) for b in block))

    def _ds(self):
        ds = getattr(self._local, "ds", None)
        if ds is None:
            ds = self._local.ds = _open_raster(self.path)
        return ds

    def __getitem__(self, key) -> np.ndarray:
        from rasterio.windows import Window

        ks, rows, cols = key
        (y0, y1, sy), (x0, x1, sx) = rows.indices(self.shape[1]), cols.indices(self.shape[2])
        bands = self.bands[ks]
        out = self._ds().read(bands, window=Window(x0, y0, max(0, x1 - x0), max(0, y1 - y0)))
        return out[:, ::sy, ::sx]


def _open_raster(path: str):
    """``rasterio.open(path)``, quiet about a file without georeferencing (a map of a slide
    has level-0 pixels, not a CRS; a file that is no map is refused by what it holds)."""
    try:
        import rasterio
    except ImportError:  # pragma: no cover - part of nofc[geo]
        raise NofcError("nofc view of a GeoTIFF map needs rasterio: pip install 'nofc[geo]'"
                        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        return rasterio.open(path)


def _open_geotiff(name: str) -> MapFile:
    try:
        with _open_raster(name) as ds:
            count, descriptions = ds.count, list(ds.descriptions)
            dtypes, t, crs = ds.dtypes, ds.transform, ds.crs
            tags, block = ds.tags(), ds.block_shapes[0]
    except NofcError:
        raise
    except Exception:  # noqa: BLE001 - RasterioIOError and the like: the same mistake
        _fail_not_map(name, "not a raster rasterio can open")
    try:
        nofc = json.loads(tags.get("nofc") or "{}")
    except ValueError:
        nofc = {}
    if not isinstance(nofc, dict):
        nofc = {}
    is_class = [(d or "").strip().lower() == CLASS_BAND for d in descriptions]
    value_bands = [b + 1 for b in range(count) if not is_class[b]]
    if not value_bands or not np.issubdtype(np.dtype(dtypes[value_bands[0] - 1]), np.floating):
        _fail_not_map(name, f"{len(value_bands)} bands of {dtypes[0]}, not one float band of "
                      "class scores per class")
    if abs(t.b) > 1e-9 * abs(t.a) or abs(t.d) > 1e-9 * abs(t.e):
        raise NofcError(f"{name} is rotated (transform {tuple(t)[:6]}); nofc view draws "
                        "north-up maps")
    placement = nofc.get("placement") if isinstance(nofc.get("placement"), dict) else {}
    world = placement.get("coordinates", "world" if crs else "level-0 pixels") == "world"
    image, record = _recorded_image(nofc)
    values = str(nofc.get("values", "scores")).lower()
    names = [descriptions[b - 1] for b in value_bands]
    if not all(names):
        names = nofc.get("classes") or names
    bands = RasterBands(name, value_bands, block)
    return MapFile(
        name=name, scores=bands, class_names=_names(names, len(value_bands)),
        cells=(t.a, t.b, t.c, t.d, t.e, t.f), coordinates="world" if world else "level-0 pixels",
        values="probabilities" if values.startswith("prob") else "scores",
        class_band=RasterBands(name, [is_class.index(True) + 1], block) if any(is_class)
        else None, crs=crs.to_wkt() if crs else None, image=image, image_record=record,
        reading={k: record[k] for k in ("bands",) if record.get(k)},
        image_shape=record.get("shape"), created=nofc.get("created"))
