"""Where the blocks of a tiled map go: memory, a zarr store, a GeoTIFF, QuPath GeoJSON,
merged regions (QuPath / RFC 7946 GeoJSON, GeoPackage, FlatGeobuf).

Each kind of output is an :class:`Output` that carries its own options (a GeoJSON's
``threshold``) and opens its :class:`Sink` once tiling knows the map (:class:`MapFacts`);
tiling never asks which kind it writes to. :func:`output_for` is the one place that reads
an output's suffix.

>>> output_for("cells.geojson", threshold=0.8)
GeoJsonOutput(path='cells.geojson', threshold=0.8, metadata=None)
>>> output_for("tissue.regions.geojson", exclude="glass")
RegionsOutput(path='tissue.regions.geojson', threshold=0.5, exclude=('glass',), metadata=None)
>>> output_for("map.shp")
Traceback (most recent call last):
...
nofc.errors.NofcError: cannot write map.shp: unknown output suffix '.shp'; use .zarr (a resumable store), .tif (a GeoTIFF), .geojson (QuPath detections), .regions.geojson, .gpkg or .fgb (merged regions)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NofcError
from .base import FileSink, MapFacts, Output, Sink
from .geojson import GeoJsonOutput, GeoJsonSink
from .geotiff import GeoTiffOutput, GeoTiffSink, RasterMap
from .masked import MaskedSink
from .memory import MemoryOutput, MemorySink
from .regions import Region, RegionsOutput, RegionsSink, merge_regions
from .store import ZarrOutput, ZarrSink

__all__ = ["Sink", "FileSink", "MapFacts", "Output", "output_for", "open_sink",
           "MemoryOutput", "MemorySink", "ZarrOutput", "ZarrSink", "GeoTiffOutput",
           "GeoTiffSink", "RasterMap", "GeoJsonOutput", "GeoJsonSink", "MaskedSink",
           "RegionsOutput", "RegionsSink", "Region", "merge_regions"]

_KINDS = {".zarr": ZarrOutput, ".tif": GeoTiffOutput, ".tiff": GeoTiffOutput,
          ".geojson": GeoJsonOutput, ".regions.geojson": RegionsOutput,
          ".gpkg": RegionsOutput, ".fgb": RegionsOutput}
_SAYS = (".zarr (a resumable store), .tif (a GeoTIFF), .geojson (QuPath detections), "
         ".regions.geojson, .gpkg or .fgb (merged regions)")


def output_for(out, **options) -> Output:
    """The :class:`Output` for ``out``: itself when it is one, memory for ``None``, else
    by the path's suffix (``.regions.geojson``: merged regions), with ``options`` that
    kind takes (a GeoJSON's ``threshold``, the regions' ``exclude``);
    an unknown suffix, or an option the kind does not take, is one NofcError."""
    if isinstance(out, Output):
        if options:
            raise NofcError(f"give {', '.join(options)} to the output object itself "
                            f"({type(out).__name__}), not beside it")
        return out
    if out is None:
        kind, path = MemoryOutput, None
    elif isinstance(out, (str, os.PathLike)):
        path = out if isinstance(out, str) else os.fspath(out)
        suffix = Path(path).suffix.lower()
        if "".join(Path(path).suffixes[-2:]).lower() == ".regions.geojson":
            suffix = ".regions.geojson"
        if suffix not in _KINDS:
            raise NofcError(f"cannot write {path}: unknown output suffix {suffix!r}; use {_SAYS}"
                            if suffix else f"cannot write {path}: the output needs a suffix; "
                            f"use {_SAYS}")
        kind = _KINDS[suffix]
    else:
        raise NofcError(f"out must be a path ending in {_SAYS}, an output object or None, "
                        f"got {type(out).__name__}")
    fields = getattr(kind, "__dataclass_fields__", {})
    wrong = [name for name in options if name not in fields or name == "path"]
    if wrong:
        what = "a map kept in memory" if path is None else f"{Path(path).suffix} output"
        raise NofcError(f"{', '.join(wrong)} does not apply to {what} (it is an option of "
                        + ", ".join(sorted({k.__name__ for k in _KINDS.values()
                                            if wrong[0] in k.__dataclass_fields__}))
                        + ")")
    return kind(**options) if path is None else kind(path, **options)


def open_sink(out, shape, dtype, **facts) -> Sink:
    """The sink of ``out`` (a path, an :class:`Output` or ``None``) for a map of ``shape``
    and ``dtype``; ``facts`` are the other fields of :class:`MapFacts`.

    >>> import numpy as np
    >>> type(open_sink(None, (2, 3, 4), np.float32)).__name__
    'MemorySink'
    """
    return output_for(out).open(MapFacts(tuple(shape), dtype, **facts))
