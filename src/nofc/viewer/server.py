"""The viewer's files, served on a local port or written to a folder.

``Viewer`` knows every file the page can ask for, by name: the page and its scripts
(``static/``), ``info.json`` (sizes, geometry, classes, palettes), ``image.dzi`` and
``image_files/L/C_R.jpeg`` (``.png`` for an image with nodata), ``overlay/K.dzi`` and
``overlay/K_files/L/C_R.png`` for class ``K``, ``overlay/class.dzi`` and its tiles (the
most probable class), and ``cells/R_C.bin`` (the readout). Tiles are made when first asked
for and kept in a cache of bounded size. A name that is none of these is not found:
nothing else on the disk can be reached (``..%2f`` included). The same names, written to a
folder, are the static export.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import re
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from ..errors import NofcError, first_line, refuse_overwrite
from ..scores import class_colour
from ..sources import open_source
from .maps import MapFile, open_map
from .tiles import CELL_TILE, TOP, ImageTiles, MapTiles

__all__ = ["Viewer", "ViewerServer", "open_result", "serve", "view", "export_viewer"]

OSD_VERSION = "6.1.1"  # the vendored OpenSeadragon (static/openseadragon/VENDOR.txt)
STATIC = Path(__file__).with_name("static")
PALETTES = ("turbo", "inferno", "viridis", "gray")
CACHE_BYTES = 96 * 2**20  # made tiles kept for the next request
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".json": "application/json",
          ".png": "image/png", ".jpeg": "image/jpeg", ".txt": "text/plain; charset=utf-8",
          ".dzi": "application/xml", ".bin": "application/octet-stream"}


@dataclass
class Result:
    """A nofc map and the image it was computed on, as the viewer shows them."""

    map: MapFile
    image: str  # the image's path
    source: object  # the image as shown (a slide at its level 0 unless told), by region
    overlay: dict  # cell (0, 0)'s top-left "x", "y" and the cells' side "cell", shown pixels
    map_downsample: float  # level-0 pixels per pixel the map read (its windows' unit)
    coords: dict  # what a shown pixel is in microns or map coordinates (readout, scale bar)

    @property
    def name(self) -> str:
        return self.map.name

    @property
    def class_names(self) -> list[str]:
        return self.map.class_names


def _find_image(result: str, recorded: str | None, image) -> str:
    if image is not None:
        return str(image)
    if recorded is None:
        raise NofcError(f"{result} does not record which image it was computed on; pass it: "
                        f"nofc view {result} IMAGE")
    for candidate in (Path(recorded), Path(result).parent / recorded):
        if candidate.is_file():
            return str(candidate)
    raise NofcError(f"{result} was computed on {recorded}, which is not there; pass the "
                    f"image's new path: nofc view {result} IMAGE")


def _hw(hw) -> str:
    return f"{round(hw[0])}x{round(hw[1])}"


def open_result(result, image=None, *, level: int | None = None) -> Result:
    """Open a nofc map (a zarr store or a GeoTIFF) and its image, or say in one line why
    not. A slide is shown at ``level`` (default 0: full resolution, whatever level or pixel
    size the map was computed at), the map drawn over it in level-0 coordinates.

    >>> open_result("no/such.zarr")
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: no/such.zarr not found: pass the zarr store or the GeoTIFF written by nofc heatmap --out
    """
    m = open_map(result)
    path = _find_image(m.name, m.image, image)
    slide = bool({"level", "mpp"} & set(m.reading)) or m.image_record.get("kind") == "slide"
    if m.coordinates == "read pixels":  # a store: the image as the map read it, checked
        read = open_source(path, **m.reading)
        hw, expected = list(read.hw), list(m.image_shape or read.hw)
        if hw != expected:
            raise NofcError(f"{path} is {_hw(hw)} but {m.name} was computed on a "
                            f"{_hw(expected)} image; pass that image")
        map_ds = read.downsample
    else:
        read, map_ds = None, tuple(m.image_record.get("downsample") or (1.0, 1.0))
    shown = None
    if level is not None or slide:
        try:
            shown = open_source(path, level=0 if level is None else level)
        except NofcError:
            if level is not None and slide:
                raise
            if level is not None:
                raise NofcError(f"--level {level} picks a level of a slide; {path} is not "
                                "one: leave --level out") from None
            # not a slide OpenSlide opens (a picture of level 0): shown as it is, checked
    if shown is None:
        shown = read or open_source(path, bands=m.reading.get("bands"))
    ds = shown.downsample
    if read is None and m.image_shape:  # a GeoTIFF: its image's level-0 size, checked
        want = [n * d for n, d in zip(m.image_shape, map_ds)]
        have = [n * d for n, d in zip(shown.hw, ds)]
        if any(abs(a - b) > d + 1 for a, b, d in zip(have, want, map_ds)):
            raise NofcError(f"{path} is {_hw(have)} (level 0) but {m.name} was computed on a "
                            f"{_hw(want)} image; pass that image")
    overlay = _overlay(m, shown, map_ds)
    return Result(m, path, shown, overlay, float(map_ds[0]), _coords(shown))


def _overlay(m: MapFile, shown, map_ds) -> dict:
    """Where the cells lie in the pixels shown: the map's affine, brought there."""
    a, _, c, _, e, f = m.cells
    if m.coordinates == "world":
        if shown.transform is None:
            raise NofcError(f"{m.name} is in map coordinates but {shown.path} is not "
                            "georeferenced; pass the raster it was computed on")
        ia, _, ic, _, ie, i_f = shown.transform
        a, c, e, f = a / ia, (c - ic) / ia, e / ie, (f - i_f) / ie
        _check_crs(m, shown)
    else:
        sy, sx = map_ds if m.coordinates == "read pixels" else (1.0, 1.0)
        dy, dx = shown.downsample
        a, c, e, f = a * sx / dx, c * sx / dx, e * sy / dy, f * sy / dy
    if a <= 0 or e <= 0 or abs(a - e) > 1e-3 * a:
        raise NofcError(f"nofc view draws square cells, north up; {m.name}'s cells are "
                        f"{a:g}x{e:g} pixels of {shown.path} (x by y)")
    return {"x": c, "y": f, "cell": a}


def _check_crs(m: MapFile, shown) -> None:
    if not (m.crs and shown.crs):
        return
    from rasterio.crs import CRS

    if CRS.from_wkt(m.crs) != CRS.from_wkt(shown.crs):
        raise NofcError(f"{m.name} is in {CRS.from_wkt(m.crs).to_string()} but {shown.path} "
                        f"is in {CRS.from_wkt(shown.crs).to_string()}; pass the raster the map "
                        "was computed on")


def _coords(shown) -> dict:
    """What a shown pixel is: ``per_pixel`` ``unit`` (the scale bar, the readout: microns
    of a slide, level-0 pixels of a picture), and a raster's ``transform`` and ``crs``."""
    if shown.transform is not None:
        t, unit, crs = shown.transform, "px", None
        if shown.crs:
            from rasterio.crs import CRS

            c = CRS.from_wkt(shown.crs)
            crs = c.to_string() or "CRS"
            unit = "°" if c.is_geographic else {"metre": "m", "meter": "m", "foot": "ft",
                                                 "US survey foot": "ft"}.get(
                                                     c.linear_units, c.linear_units or "")
        return {"kind": "world", "unit": unit, "per_pixel": abs(t[0]), "transform": list(t),
                "crs": crs}
    if shown.mpp is not None:
        return {"kind": "slide", "unit": "µm", "per_pixel": (shown.mpp[0] + shown.mpp[1]) / 2}
    return {"kind": "pixels", "unit": "px", "per_pixel": sum(shown.downsample) / 2}


class _Cache:
    """Made files by name, least recently used dropped past ``limit`` bytes."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, make) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: tiles are made in parallel
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self.size += len(value)
            while self.size > self.limit and len(self._items) > 1:
                self.size -= len(self._items.popitem(last=False)[1])
        return value


_N = r"(0|[1-9][0-9]*)"  # a number without leading zeros: one name per file


class Viewer:
    """Every file of the page for one map, by name (``get``), made on demand.

    >>> import tempfile, numpy as np, PIL.Image, nofc
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> PIL.Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / "img.png")
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32))
    >>> _ = nofc.tiled_predict(fcn, d / "img.png", (1, 32, 32), out=d / "m.zarr",
    ...                        progress=False)
    >>> v = Viewer(open_result(d / "m.zarr", image=d / "img.png"))
    >>> v.get("overlay/3_files/0/0_0.png")[0], v.info["map"]["height"]
    ('image/png', 9)
    >>> v.get("..%2fm.zarr")
    Traceback (most recent call last):
    ...
    LookupError: ..%2fm.zarr
    """

    def __init__(self, result: Result):
        self.result = result
        self.image = ImageTiles(result.source)
        m = result.map
        self.map = MapTiles(m.scores, values=m.values, class_band=m.class_band)
        self._cache = _Cache(CACHE_BYTES)
        fmt = self.image.format
        self._routes = [
            (re.compile(r"info\.json"), self.info_json),
            (re.compile(r"image\.dzi"), lambda: self.image.pyramid.dzi(fmt).encode()),
            (re.compile(rf"image_files/{_N}/{_N}_{_N}\.{fmt}"), self.image.tile),
            (re.compile(rf"overlay/{_N}\.dzi"), self._overlay_dzi),
            (re.compile(rf"overlay/{_N}_files/{_N}/{_N}_{_N}\.png"), self.map.tile),
            (re.compile(r"overlay/class\.dzi"), lambda: self.map.pyramid.dzi("png").encode()),
            (re.compile(rf"overlay/class_files/{_N}/{_N}_{_N}\.png"), self.map.class_tile),
            (re.compile(rf"cells/{_N}_{_N}\.bin"), self.map.cells),
        ]
        self.info = self._info()

    def _overlay_dzi(self, k: int) -> bytes:
        if not 0 <= k < self.map.classes:
            raise LookupError(f"no class {k}")
        return self.map.pyramid.dzi("png").encode()

    def _info(self) -> dict:
        r, m = self.result, self.result.map
        order = sorted(range(self.map.classes), key=lambda k: (-float(self.map.peaks[k]), k))
        key = hashlib.sha256(json.dumps([str(Path(r.name).resolve()), m.created,
                                         r.image]).encode()).hexdigest()[:12]
        level = getattr(r.source, "level", None)
        return {
            "key": key,
            "title": f"{Path(r.name).name} over {Path(r.image).name}"
                     + (f" (level {level})" if level else ""),
            "image": {"width": self.image.pyramid.width, "height": self.image.pyramid.height,
                      "format": self.image.format, "level": level,
                      "downsample": list(r.source.downsample),  # level-0 px per pixel
                      "stretch": self.image.stretch_note()},
            "map": {"height": self.map.pyramid.height, "width": self.map.pyramid.width,
                    "classes": self.map.classes, "values": m.values,
                    "class_band": m.class_band is not None,
                    # a window (y0, x0, y1, x1) in level-0 pixels: (oy + i*s, ...) * this
                    "downsample": r.map_downsample, **(m.geometry or {})},
            # the overlay in shown pixels: cell (i, j) is the square of side `cell` at
            # (x + j*cell, y + i*cell), centred on its window's centre
            "overlay": r.overlay,
            "coords": r.coords,
            "classes": [{"index": k, "name": r.class_names[k],
                         "peak": round(float(self.map.peaks[k]), 4)} for k in order],
            "legend": [{"index": k, "name": r.class_names[k], "color": c}
                       for k, c in enumerate(class_colours(self.map.classes))],
            "cells": {"tile": CELL_TILE, "top": min(TOP, self.map.classes)},
            "palettes": _palettes(),
        }

    def info_json(self) -> bytes:
        return json.dumps(self.info).encode()

    def get(self, name: str) -> tuple[str, bytes]:
        """``(content type, bytes)`` of the file ``name``; LookupError for any other name."""
        name = name or "index.html"
        static = _static_files()
        if name in static:
            return _TYPES.get(Path(name).suffix, "application/octet-stream"), static[name]
        for pattern, make in self._routes:
            m = pattern.fullmatch(name)
            if m:
                suffix = Path(name).suffix
                value = self._cache.get(name, lambda: make(*(int(g) for g in m.groups())))
                return _TYPES[suffix], value
        raise LookupError(name)

    def names(self):
        """Every file the page can ask for (the static export writes these)."""
        yield from _static_files()
        yield "info.json"
        yield "image.dzi"
        fmt = self.image.format
        yield from (f"image_files/{lv}/{c}_{r}.{fmt}" for lv, c, r in self.image.pyramid.tiles())
        for k in [*range(self.map.classes), "class"]:
            yield f"overlay/{k}.dzi"
            yield from (f"overlay/{k}_files/{lv}/{c}_{r}.png"
                        for lv, c, r in self.map.pyramid.tiles())
        rows, cols = self.map.cell_grid()
        yield from (f"cells/{r}_{c}.bin" for r in range(rows) for c in range(cols))


@functools.lru_cache(maxsize=1)
def _static_files() -> dict[str, bytes]:
    """The page, its scripts and the vendored OpenSeadragon, by name."""
    return {p.relative_to(STATIC).as_posix(): p.read_bytes()
            for p in sorted(STATIC.rglob("*")) if p.is_file()}


def class_colours(k: int) -> list[list[int]]:
    """The ``k`` colours of the class view and its legend: those of the map's files
    (:func:`nofc.scores.class_colour`).

    >>> class_colours(2)
    [[31, 119, 180], [255, 127, 14]]
    """
    return [list(class_colour(i, k)) for i in range(k)]


def _palettes() -> dict[str, list[int]]:
    """Each palette as 256 RGB triplets, flattened (from matplotlib's colour maps)."""
    import matplotlib

    ramp = np.linspace(0, 1, 256)
    return {name: (np.asarray(matplotlib.colormaps[name](ramp))[:, :3] * 255 + 0.5)
            .astype(np.uint8).reshape(-1).tolist() for name in PALETTES}


# --------------------------------------------------------------------------- serving


class _Handler(BaseHTTPRequestHandler):
    server_version = "nofc-view"

    def do_GET(self):  # noqa: N802 - http.server's name
        self._reply(body=True)

    def do_HEAD(self):  # noqa: N802
        self._reply(body=False)

    def _reply(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        try:
            if not path.startswith("/"):
                raise LookupError(path)
            ctype, data = self.server.viewer.get(path[1:])
        except LookupError:
            self.send_error(404, "not a file of this viewer")
            return
        except Exception as exc:  # noqa: BLE001 - one bad tile must not stop the server
            print(f"nofc view: {path}: {type(exc).__name__}: {first_line(exc)}",
                  file=sys.stderr)
            self.send_error(500, first_line(exc))
            return
        tile = path.endswith((".jpeg", ".png", ".bin")) and "_files/" in path or "cells/" in path
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "max-age=600" if tile else "no-cache")
            self.end_headers()
            if body:
                self.wfile.write(data)
        except ConnectionError:  # the browser gave up on a tile it no longer shows
            pass

    def log_message(self, format, *args):  # noqa: A002 - quiet: one line per tile is noise
        pass


class ViewerServer(ThreadingHTTPServer):
    """An HTTP server for one ``Viewer``; ``url`` is its address."""

    daemon_threads = True

    def __init__(self, viewer: Viewer, host: str, port: int):
        self.viewer = viewer
        if not 0 <= port <= 65535:
            raise NofcError(f"port must be 0 to 65535, got {port}")
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            if exc.errno == 98 or "in use" in str(exc):
                raise NofcError(f"port {port} on {host} is in use; pick another with --port, "
                                "or leave --port out for a free one") from None
            raise NofcError(f"cannot listen on {host}:{port}: {first_line(exc)}") from None
        h, p = self.server_address[:2]
        self.url = f"http://{h if ':' not in h else f'[{h}]'}:{p}/"


def serve(result, image=None, *, port: int | None = None, host: str = "127.0.0.1",
          level: int | None = None) -> ViewerServer:
    """A server for the map ``result``, listening but not yet serving (call
    ``serve_forever``); ``port=None`` picks a free port; ``level``: the slide level shown
    beneath the map (default 0)."""
    viewer = Viewer(open_result(result, image, level=level))
    return ViewerServer(viewer, host, 0 if port is None else int(port))


def view(result, image=None, port: int | None = None, *, host: str = "127.0.0.1",
         level: int | None = None) -> None:
    """Serve the viewer of ``result`` until interrupted (Ctrl-C), printing its address.

    ``image`` overrides the image the map records (a moved file); ``port=None`` picks
    a free port; the server listens on ``host`` only (loopback by default); ``level`` is
    the slide level shown beneath the map (default 0, full resolution).
    """
    server = serve(result, image, port=port, host=host, level=level)
    print(f"nofc view: {server.viewer.info['title']} at {server.url} (Ctrl-C to stop)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def export_viewer(result, out_dir, image=None, *, force: bool = False,
                  progress: bool = True, level: int | None = None) -> Path:
    """Write the viewer of ``result`` as a static folder: the page, its scripts, and every
    tile of the image and of each class's overlay, for any static HTTP server.

    The folder is written under a temporary name and renamed into place at the end.
    """
    out = Path(out_dir)
    refuse_overwrite(out, force=force)
    if not out.parent.is_dir():
        raise NofcError(f"cannot write {out}: folder {out.parent} does not exist")
    viewer = Viewer(open_result(result, image, level=level))
    names = list(viewer.names())
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    from tqdm.auto import tqdm

    try:
        for name in tqdm(names, desc="nofc export", unit="file", disable=not progress):
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(viewer.get(name)[1])
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
