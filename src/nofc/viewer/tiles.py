"""Deep-zoom pyramids of an image and of its map, made tile by tile from region reads.

Both follow the Deep Zoom (DZI) layout that OpenSeadragon reads: level ``L`` of a
``W x H`` picture is ``ceil(W / f) x ceil(H / f)`` pixels with ``f = 2**(top - L)`` and
``top = ceil(log2(max(W, H)))``, cut into ``TILE``-pixel squares named ``L/col_row``. A
tile is made when it is asked for: each of its pixels is the mean of the ``f x f`` pixels
under it. Reads stay bounded whatever the picture's size: a tile reads every
``max(1, f // 4)``-th pixel of its region, and the levels coarser than an *overview* (the
whole picture, at most ``OVERVIEW`` pixels across, made once in one pass of region reads)
are cut from the overview.

An 8-bit image is shown as it is. Any other (a uint16 scene, a float raster) is stretched:
each shown band's 2nd to 98th percentile (``STRETCH``, of the overview's pixels with data)
becomes 0 to 255. Nodata pixels (a raster's nodata value, NaN) are left out of every mean
and are transparent: such an image's tiles are PNG with alpha, not JPEG.

The map's pyramid has one pixel per map cell; its pixels are class probabilities (the
softmax of the stored scores over the classes, or the stored values when they are
probabilities) coded as bytes: 0 for no value (a NaN cell), ``1 + round(254 p)`` for
probability ``p``. The page colours them. The class pyramid codes each cell's class ``k``
(the class band's, else the most probable) as ``1 + k``.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import NofcError
from ..images import default_scale
from ..scores import probabilities

__all__ = ["TILE", "Pyramid", "ImageTiles", "MapTiles", "box_mean", "STRETCH"]

TILE = 256  # pixels per tile side, both pyramids
OVERVIEW = 2048  # longest side of the image overview
MAP_OVERVIEW_BYTES = 48 * 2**20  # all classes' probability overview, one byte per value
CELL_TILE = 128  # map cells per side of a readout tile (cells/ROW_COL.bin)
TOP = 3  # classes per cell in the readout
STRETCH = (2.0, 98.0)  # percentiles shown as black and white (images other than 8-bit)


@dataclass(frozen=True)
class Pyramid:
    """The Deep Zoom levels and tiles of a ``width x height`` picture.

    >>> p = Pyramid(600, 300)
    >>> p.top, p.level_size(p.top), p.level_size(8), p.tile_box(10, 2, 1)
    (10, (600, 300), (150, 75), (1, 256, 300, 512, 600))
    """

    width: int
    height: int

    @property
    def top(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    def factor(self, level: int) -> int:
        if not 0 <= level <= self.top:
            raise LookupError(f"no level {level}")
        return 2 ** (self.top - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """``(width, height)`` of a level in its own pixels."""
        f = self.factor(level)
        return (-(-self.width // f), -(-self.height // f))

    def grid(self, level: int) -> tuple[int, int]:
        """``(cols, rows)`` of tiles at a level."""
        w, h = self.level_size(level)
        return (-(-w // TILE), -(-h // TILE))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int, int]:
        """``(f, y0, y1, x0, x1)``: the factor and the level-0 pixels under a tile."""
        f = self.factor(level)
        cols, rows = self.grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise LookupError(f"no tile {col}_{row} at level {level}")
        y0, x0 = row * TILE * f, col * TILE * f
        return f, y0, min(y0 + TILE * f, self.height), x0, min(x0 + TILE * f, self.width)

    def tiles(self):
        """Every ``(level, col, row)``, coarse to fine."""
        for level in range(self.top + 1):
            cols, rows = self.grid(level)
            for row in range(rows):
                for col in range(cols):
                    yield level, col, row

    def dzi(self, fmt: str) -> str:
        """The ``.dzi`` descriptor OpenSeadragon opens."""
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
                f'Format="{fmt}" Overlap="0" TileSize="{TILE}">'
                f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n')


def box_mean(a: np.ndarray, g: int) -> np.ndarray:
    """Mean of each ``g x g`` block of a ``(C, h, w)`` array, NaNs left out (partial
    blocks at the ends included): ``(C, ceil(h / g), ceil(w / g))`` float32.

    >>> box_mean(np.arange(6, dtype=np.float32).reshape(1, 2, 3), 2).tolist()
    [[[2.0, 3.5]]]
    """
    a = np.asarray(a, dtype=np.float32)
    if g == 1:
        return a
    c, h, w = a.shape
    hh, ww = -(-h // g), -(-w // g)
    padded = np.full((c, hh * g, ww * g), np.nan, dtype=np.float32)
    padded[:, :h, :w] = a
    blocks = padded.reshape(c, hh, g, ww, g)
    valid = ~np.isnan(blocks)
    total = np.where(valid, blocks, 0).sum(axis=(2, 4))
    count = valid.sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _pow2_at_least(x: float) -> int:
    return 2 ** max(0, math.ceil(math.log2(max(x, 1.0))))


def _encode(fmt: str, pixels: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels, mode).save(buf, "JPEG", quality=90)
    else:
        Image.fromarray(pixels, mode).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class ImageTiles:
    """Tiles of an image (``nofc.sources.ImageSource``), read by region: JPEG, or PNG with
    alpha when the image can have nodata.

    >>> from nofc.sources import open_source
    >>> t = ImageTiles(open_source(np.full((300, 500, 3), 200, np.uint8)))
    >>> t.pyramid.top, t.format, t.tile(9, 0, 0)[:2]
    (9, 'jpeg', b'\\xff\\xd8')
    >>> u = ImageTiles(open_source(np.arange(100 * 100, dtype=np.uint16).reshape(100, 100, 1)))
    >>> u.stretch_note()["low"], u.stretch_note()["high"]
    ([199.98], [9799.02])
    """

    def __init__(self, src):
        self.src = src
        h, w = src.hw
        self.pyramid = Pyramid(int(w), int(h))
        dtype = np.dtype(src.dtype)
        self.stretched = dtype != np.uint8
        self.scale = 1.0 if self.stretched else default_scale(dtype)
        self.nodata = getattr(src, "nodata", None)
        self.format = "png" if self.nodata is not None or dtype.kind == "f" else "jpeg"
        self.ov_factor = _pow2_at_least(max(h, w) / OVERVIEW)
        self._overview = self._range = None
        self._lock = threading.Lock()

    def _read(self, y0: int, y1: int, x0: int, x1: int, f: int) -> np.ndarray:
        """``(C, ceil((y1-y0)/f), ceil((x1-x0)/f))`` means (every s-th pixel; nodata NaN):
        in [0, 1] for an 8-bit image, as stored for the others."""
        s = max(1, f // 4)
        region = self.src.read(slice(y0, y1, s), slice(x0, x1, s))  # (C, h, w)
        values = region.astype(np.float32) * np.float32(self.scale)
        if self.nodata is not None:
            values[region == self.nodata] = np.nan
        return box_mean(values, f // s)

    def overview(self) -> np.ndarray:
        """The whole image at ``1 / ov_factor``, made once from blocks of 256 output rows."""
        with self._lock:
            if self._overview is None:
                f, (h, w) = self.ov_factor, (self.pyramid.height, self.pyramid.width)
                step = f * TILE
                parts = []
                for y in range(0, h, step):
                    parts.append(np.concatenate(
                        [self._read(y, min(y + step, h), x, min(x + step, w), f)
                         for x in range(0, w, step)], axis=2))
                self._overview = np.concatenate(parts, axis=1)
            return self._overview

    def stretch(self) -> tuple[np.ndarray, np.ndarray]:
        """Per shown band, the values shown as 0 and 1: ``STRETCH`` percentiles of the
        overview's pixels with data (an 8-bit image: 0 and 1, as it is)."""
        if self._range is None:
            ov = _shown(self.overview())
            if not self.stretched:
                self._range = (np.zeros(len(ov)), np.ones(len(ov)))
            else:
                flat = ov.reshape(len(ov), -1)
                lo, hi = np.zeros(len(ov)), np.ones(len(ov))
                for b, band in enumerate(flat):
                    band = band[np.isfinite(band)]
                    if band.size:
                        lo[b], hi[b] = np.percentile(band, STRETCH)
                        if hi[b] <= lo[b]:  # a flat band: its value shown mid-gray
                            lo[b], hi[b] = lo[b] - 0.5, lo[b] + 0.5
                self._range = (lo, hi)
        return self._range

    def stretch_note(self) -> dict | None:
        """The stretch, for ``info.json``: None for an 8-bit image."""
        if not self.stretched:
            return None
        lo, hi = self.stretch()
        return {"percentiles": list(STRETCH), "low": [round(float(v), 6) for v in lo],
                "high": [round(float(v), 6) for v in hi]}

    def pixels(self, level: int, col: int, row: int) -> np.ndarray:
        """A tile's ``(C, h, w)`` float pixels (see ``_read``)."""
        f, y0, y1, x0, x1 = self.pyramid.tile_box(level, col, row)
        if f < self.ov_factor:
            return self._read(y0, y1, x0, x1, f)
        o = self.ov_factor
        ov = self.overview()[:, y0 // o:-(-y1 // o), x0 // o:-(-x1 // o)]
        return box_mean(ov, f // o)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """A tile: gray or RGB (the first band, or the first three), stretched; JPEG, or
        PNG whose alpha is 0 where a shown band has no data."""
        px = _shown(self.pixels(level, col, row))
        lo, hi = self.stretch()
        px = (px - lo[:, None, None].astype(np.float32)) / (hi - lo)[:, None, None]
        out = np.clip(np.nan_to_num(px) * 255 + 0.5, 0, 255).astype(np.uint8)
        if self.format == "png":
            alpha = np.isfinite(px).all(axis=0, keepdims=True).astype(np.uint8) * 255
            out = np.concatenate([out, alpha])
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[out.shape[0]]
        pixels = out[0] if mode == "L" else np.ascontiguousarray(np.moveaxis(out, 0, -1))
        return _encode(self.format, pixels, mode)


def _shown(px: np.ndarray) -> np.ndarray:
    """The bands shown: the first three (RGB) or the first one (gray). Alpha is already
    composited by the source, so a 2- or 4-band image has that many bands of data."""
    return px[:3] if px.shape[0] >= 3 else px[:1]


def code(p: np.ndarray) -> np.ndarray:
    """Probabilities as bytes: 0 for NaN, else ``1 + round(254 p)``."""
    return np.where(np.isnan(p), 0, 1 + np.rint(np.nan_to_num(p) * 254)).astype(np.uint8)


def decode(c: np.ndarray) -> np.ndarray:
    return np.where(c == 0, np.nan, (c.astype(np.float32) - 1) / 254).astype(np.float32)


def _as_probabilities(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


class MapTiles:
    """Probability tiles (one pixel per cell), class tiles and readout tiles of a
    ``(K, h, w)`` map of scores (``values="scores"``: shown as their softmax) or of
    probabilities (``values="probabilities"``: shown as they are); ``class_band``, a
    ``(1, h, w)`` array of class indices, is the class view (default: the most probable).

    Opening it reads the map once, block by block: each class's peak probability (to list
    the classes) and an overview of all classes small enough to keep.

    >>> m = MapTiles(np.zeros((2, 40, 60), np.float32))
    >>> m.peaks.tolist(), m.pyramid.top, len(m.tile(0, 6, 0, 0)) > 0
    ([0.5, 0.5], 6, True)
    """

    def __init__(self, scores, *, values: str = "scores", class_band=None):
        if values not in ("scores", "probabilities"):
            raise NofcError(f"values must be 'scores' or 'probabilities', got {values!r}")
        self.scores, self.class_band = scores, class_band
        self._prob = probabilities if values == "scores" else _as_probabilities
        k, h, w = (int(n) for n in scores.shape)
        self.classes, self.pyramid = k, Pyramid(w, h)
        chunks = getattr(scores, "chunks", None) or (k, h, w)
        self.chunk = (int(chunks[1]), int(chunks[2]))
        f = 1
        while k * -(-h // f) * -(-w // f) > MAP_OVERVIEW_BYTES:
            f *= 2
        self.ov_factor = f
        self.overview = np.zeros((k, -(-h // f), -(-w // f)), np.uint8)
        self.peaks = np.zeros(k, np.float32)
        for y, x, p in self._blocks(0, h, 0, w, 1, align=f):
            self.peaks = np.maximum(self.peaks, np.where(np.isnan(p), 0, p).max(axis=(1, 2)))
            o = box_mean(p, f)
            self.overview[:, y // f:y // f + o.shape[1], x // f:x // f + o.shape[2]] = code(o)
        self.class_overview = None if class_band is None else self._classes(0, h, 0, w, f)

    def _blocks(self, a: int, b: int, c: int, d: int, s: int, align: int):
        """Probabilities of the cells ``[a:b:s, c:d:s]``, a block of about one chunk at a
        time: ``(y, x, (K, bh, bw))`` with ``y, x`` the block's first cell."""
        by = -(-max(self.chunk[0], align, s) // align) * align
        bx = -(-max(self.chunk[1], align, s) // align) * align
        by, bx = -(-by // s) * s, -(-bx // s) * s
        for y in range(a, b, by):
            for x in range(c, d, bx):
                block = np.asarray(self.scores[:, y:min(y + by, b):s, x:min(x + bx, d):s])
                yield y, x, self._prob(block)

    def probabilities(self, k, a: int, b: int, c: int, d: int, s: int) -> np.ndarray:
        """Class ``k``'s (an index, or a slice of classes) probabilities at the cells
        ``[a:b:s, c:d:s]``, ``(1, h, w)`` (``(n, h, w)`` for a slice)."""
        ks = k if isinstance(k, slice) else slice(k, k + 1)
        n = len(range(*ks.indices(self.classes)))
        out = np.empty((n, -(-(b - a) // s), -(-(d - c) // s)), np.float32)
        for y, x, p in self._blocks(a, b, c, d, s, align=1):
            oy, ox = (y - a) // s, (x - c) // s
            out[:, oy:oy + p.shape[1], ox:ox + p.shape[2]] = p[ks]
        return out

    def _classes(self, a: int, b: int, c: int, d: int, s: int) -> np.ndarray:
        """The class band's codes (``1 + k``; 0: none) at the cells ``[a:b:s, c:d:s]``,
        read a chunk of rows at a time."""
        rows = -(-max(self.chunk[0], s) // s) * s
        parts = [np.asarray(self.class_band[0:1, y:min(y + rows, b):s, c:d:s])[0]
                 for y in range(a, b, rows)]
        k = np.concatenate(parts).astype(np.float64)
        valid = np.isfinite(k) & (k >= 0) & (k < min(self.classes, 255)) & (k == np.rint(k))
        return np.where(valid, 1 + np.nan_to_num(k), 0).astype(np.uint8)

    def _level(self, ks: slice, level: int, col: int, row: int) -> np.ndarray:
        """Classes ``ks``'s probabilities in a tile: ``(n, h, w)`` means of the cells under
        each pixel (fine levels read, coarse ones cut from the overview)."""
        f, y0, y1, x0, x1 = self.pyramid.tile_box(level, col, row)
        o = self.ov_factor
        if f < o:
            s = max(1, f // 4)
            return box_mean(self.probabilities(ks, y0, y1, x0, x1, s), f // s)
        return box_mean(decode(self.overview[ks, y0 // o:-(-y1 // o), x0 // o:-(-x1 // o)]),
                        f // o)

    def tile(self, k: int, level: int, col: int, row: int) -> bytes:
        """Class ``k``'s probability tile as an 8-bit gray PNG of codes (see ``code``)."""
        if not 0 <= k < self.classes:
            raise LookupError(f"no class {k}")
        return _encode("png", code(self._level(slice(k, k + 1), level, col, row)[0]), "L")

    def class_tile(self, level: int, col: int, row: int) -> bytes:
        """The class view's tile as an 8-bit gray PNG of codes ``1 + k`` (0: no value):
        the class band's class of the first cell under each pixel, or else the class of
        highest mean probability over the cells under it."""
        if self.class_band is None:
            p = self._level(slice(None), level, col, row)
            none = np.isnan(p).any(axis=0)
            codes = np.where(none, 0, 1 + np.argmax(np.nan_to_num(p, nan=-1.0), axis=0))
            return _encode("png", np.minimum(codes, 255).astype(np.uint8), "L")
        f, y0, y1, x0, x1 = self.pyramid.tile_box(level, col, row)
        o = self.ov_factor
        if f < o:
            codes = self._classes(y0, y1, x0, x1, f)
        else:
            codes = self.class_overview[y0 // o:-(-y1 // o):f // o, x0 // o:-(-x1 // o):f // o]
        return _encode("png", np.ascontiguousarray(codes), "L")

    def cell_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of readout tiles."""
        return (-(-self.pyramid.height // CELL_TILE), -(-self.pyramid.width // CELL_TILE))

    def cells(self, row: int, col: int) -> bytes:
        """The readout tile ``(row, col)``: for its ``CELL_TILE``-square of cells, the
        ``TOP`` most probable classes, little-endian ``uint16 index[TOP][h][w]`` (65535:
        no value) then ``uint16 round(65535 p)[TOP][h][w]``."""
        rows, cols = self.cell_grid()
        if not (0 <= row < rows and 0 <= col < cols):
            raise LookupError(f"no cell tile {row}_{col}")
        a, c = row * CELL_TILE, col * CELL_TILE
        b, d = min(a + CELL_TILE, self.pyramid.height), min(c + CELL_TILE, self.pyramid.width)
        n = min(TOP, self.classes)
        index = np.full((n, b - a, d - c), 65535, np.uint16)
        prob = np.zeros((n, b - a, d - c), np.uint16)
        for y, x, p in self._blocks(a, b, c, d, 1, align=1):
            order = np.argsort(-np.nan_to_num(p, nan=-1.0), axis=0, kind="stable")[:n]
            top = np.take_along_axis(p, order, axis=0)
            sl = (slice(None), slice(y - a, y - a + p.shape[1]), slice(x - c, x - c + p.shape[2]))
            valid = ~np.isnan(top)
            index[sl] = np.where(valid, order, 65535)
            prob[sl] = np.rint(np.nan_to_num(top) * 65535)
        return index.astype("<u2").tobytes() + prob.astype("<u2").tobytes()


def check_square_step(step: tuple[int, int]) -> int:
    """The map's step when it is the same along y and x (the overlay has square cells)."""
    if step[0] != step[1]:
        raise NofcError(f"nofc view draws square cells; this map's step is {step[0]}x{step[1]}"
                        " (y x x): compute it with equal steps")
    return int(step[0])
