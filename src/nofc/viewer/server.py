"""The viewer's files, served on a local port or written to a folder.

``Viewer`` knows every file the page can ask for, by name: the page and its scripts
(``static/``), ``info.json`` (sizes, geometry, classes, palettes), ``image.dzi`` and
``image_files/L/C_R.jpeg``, ``overlay/K.dzi`` and ``overlay/K_files/L/C_R.png`` for class
``K``, and ``cells/R_C.bin`` (the readout). Tiles are made when first asked for and kept
in a cache of bounded size. A name that is none of these is not found: nothing else on
the disk can be reached (``..%2f`` included). The same names, written to a folder, are
the static export.
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
from ..sources import open_source
from ..windows import parse_step
from .tiles import CELL_TILE, TOP, ImageTiles, MapTiles, check_square_step

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
    """A nofc map and the image it was computed on, as the viewer needs them."""

    name: str  # the store as given
    scores: object  # (K, h, w) zarr array of raw scores
    attrs: dict  # the store's attrs["nofc"]
    image: str  # the image's path
    source: object  # the image: a nofc.sources.ImageSource, read by region
    step: int
    class_names: list[str]


def _fail_not_map(result, why: str):
    raise NofcError(f"{result} is not a nofc map ({why}); pass the zarr store written by "
                    "nofc heatmap --out or nofc.tiled_predict(out=...)")


def _recorded_image(attrs: dict) -> str | None:
    """The image path a store records (``attrs["image"]`` or ``metadata["image"]``)."""
    for where in (attrs, attrs.get("metadata") or {}):
        value = where.get("image")
        if isinstance(value, dict):
            value = value.get("path")
        if isinstance(value, str) and value:
            return value
    return None


def _find_image(result: str, attrs: dict, image) -> str:
    if image is not None:
        return str(image)
    recorded = _recorded_image(attrs)
    if recorded is None:
        raise NofcError(f"{result} does not record which image it was computed on; pass it: "
                        f"nofc view {result} IMAGE")
    for candidate in (Path(recorded), Path(result).parent / recorded):
        if candidate.is_file():
            return str(candidate)
    raise NofcError(f"{result} was computed on {recorded}, which is not there; pass the "
                    f"image's new path: nofc view {result} IMAGE")


def open_result(result, image=None) -> Result:
    """Open a nofc map and its image, or say in one line why not.

    >>> open_result("no/such.zarr")
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: no/such.zarr not found: pass the zarr store written by nofc heatmap --out or nofc.tiled_predict(out=...)
    """
    name = str(result)
    if not Path(name).exists():
        raise NofcError(f"{name} not found: pass the zarr store written by nofc heatmap --out "
                        "or nofc.tiled_predict(out=...)")
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
    path = _find_image(name, attrs, image)
    reading = {k: args[k] for k in ("level", "mpp", "bands") if args.get(k) is not None}
    source = open_source(path, **reading)  # as the map read it: a slide's level, bands
    hw = list(source.hw)
    expected = list(args.get("image_shape") or hw)
    if hw != expected:
        raise NofcError(f"{path} is {hw[0]}x{hw[1]} but {name} was computed on a "
                        f"{expected[0]}x{expected[1]} image; pass that image")
    names = (attrs.get("metadata") or {}).get("classes") or []
    k = int(scores.shape[0])
    class_names = [str(names[i]) if i < len(names) else f"class {i}" for i in range(k)]
    return Result(name, scores, attrs, path, source, step, class_names)


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
        self.map = MapTiles(result.scores)
        self._cache = _Cache(CACHE_BYTES)
        self._routes = [
            (re.compile(r"info\.json"), self.info_json),
            (re.compile(r"image\.dzi"), lambda: self.image.pyramid.dzi("jpeg").encode()),
            (re.compile(rf"image_files/{_N}/{_N}_{_N}\.jpeg"), self.image.tile),
            (re.compile(rf"overlay/{_N}\.dzi"), self._overlay_dzi),
            (re.compile(rf"overlay/{_N}_files/{_N}/{_N}_{_N}\.png"), self.map.tile),
            (re.compile(rf"cells/{_N}_{_N}\.bin"), self.map.cells),
        ]
        self.info = self._info()

    def _overlay_dzi(self, k: int) -> bytes:
        if not 0 <= k < self.map.classes:
            raise LookupError(f"no class {k}")
        return self.map.pyramid.dzi("png").encode()

    def _info(self) -> dict:
        r, geo = self.result, self.result.attrs["geometry"]
        (oy, ox), (wh, ww), s = geo["offset"], geo["window"], r.step
        order = sorted(range(self.map.classes), key=lambda k: (-float(self.map.peaks[k]), k))
        key = hashlib.sha256(json.dumps([str(Path(r.name).resolve()), r.attrs.get("created"),
                                         r.image]).encode()).hexdigest()[:12]
        return {
            "key": key,
            "title": f"{Path(r.name).name} over {Path(r.image).name}",
            "image": {"width": self.image.pyramid.width, "height": self.image.pyramid.height},
            "map": {"height": self.map.pyramid.height, "width": self.map.pyramid.width,
                    "classes": self.map.classes, "step": s, "stride": geo["stride"],
                    "offset": [oy, ox], "window": [wh, ww], "exact": geo.get("exact")},
            # the overlay's top-left in image pixels: cell (0, 0)'s square of side `step`
            # centred on its window's centre
            "overlay": {"x": ox + ww / 2 - s / 2, "y": oy + wh / 2 - s / 2, "cell": s},
            "classes": [{"index": k, "name": r.class_names[k],
                         "peak": round(float(self.map.peaks[k]), 4)} for k in order],
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
        yield from (f"image_files/{lv}/{c}_{r}.jpeg" for lv, c, r in self.image.pyramid.tiles())
        for k in range(self.map.classes):
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


def serve(result, image=None, *, port: int | None = None,
          host: str = "127.0.0.1") -> ViewerServer:
    """A server for the map ``result``, listening but not yet serving (call
    ``serve_forever``); ``port=None`` picks a free port."""
    viewer = Viewer(open_result(result, image))
    return ViewerServer(viewer, host, 0 if port is None else int(port))


def view(result, image=None, port: int | None = None, *, host: str = "127.0.0.1") -> None:
    """Serve the viewer of ``result`` until interrupted (Ctrl-C), printing its address.

    ``image`` overrides the image the store records (a moved file); ``port=None`` picks
    a free port; the server listens on ``host`` only (loopback by default).
    """
    server = serve(result, image, port=port, host=host)
    print(f"nofc view: {server.viewer.info['title']} at {server.url} (Ctrl-C to stop)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def export_viewer(result, out_dir, image=None, *, force: bool = False,
                  progress: bool = True) -> Path:
    """Write the viewer of ``result`` as a static folder: the page, its scripts, and every
    tile of the image and of each class's overlay, for any static HTTP server.

    The folder is written under a temporary name and renamed into place at the end.
    """
    out = Path(out_dir)
    refuse_overwrite(out, force=force)
    if not out.parent.is_dir():
        raise NofcError(f"cannot write {out}: folder {out.parent} does not exist")
    viewer = Viewer(open_result(result, image))
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
