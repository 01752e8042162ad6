"""Deep-zoom pyramids of an image and of its map, made tile by tile from region reads.

Both follow the Deep Zoom (DZI) layout that OpenSeadragon reads: level ``L`` of a
``W x H`` picture is ``ceil(W / f) x ceil(H / f)`` pixels with ``f = 2**(top - L)`` and
``top = ceil(log2(max(W, H)))``, cut into ``TILE``-pixel squares named ``L/col_row``. A
tile is made when it is asked for: each of its pixels is the mean of the ``f x f`` pixels
under it. Reads stay bounded whatever the picture's size: a tile reads every
``max(1, f // 4)``-th pixel of its region, and the levels coarser than an *overview* (the
whole picture, at most ``OVERVIEW`` pixels across, made once in one pass of region reads)
are cut from the overview.

The map's pyramid has one pixel per map cell; its pixels are class probabilities (the
softmax of the stored scores over the classes) coded as bytes: 0 for no value (a NaN
cell), ``1 + round(254 p)`` for probability ``p``. The page colours them.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import NofcError
from ..images import default_scale

__all__ = ["TILE", "Pyramid", "ImageTiles", "MapTiles", "box_mean"]

TILE = 256  # pixels per tile side, both pyramids
OVERVIEW = 2048  # longest side of the image overview
MAP_OVERVIEW_BYTES = 48 * 2**20  # all classes' probability overview, one byte per value
CELL_TILE = 128  # map cells per side of a readout tile (cells/ROW_COL.bin)
TOP = 3  # classes per cell in the readout


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
    """JPEG tiles of an image (``nofc.sources.ImageSource``), read by region.

    >>> from nofc.sources import open_source
    >>> t = ImageTiles(open_source(np.full((300, 500, 3), 200, np.uint8)))
    >>> t.pyramid.top, t.tile(9, 0, 0)[:2]
    (9, b'\\xff\\xd8')
    """

    def __init__(self, src):
        self.src = src
        h, w = src.hw
        self.pyramid = Pyramid(int(w), int(h))
        self.scale = default_scale(src.dtype)
        self.ov_factor = _pow2_at_least(max(h, w) / OVERVIEW)
        self._overview = None
        self._lock = threading.Lock()

    def _read(self, y0: int, y1: int, x0: int, x1: int, f: int) -> np.ndarray:
        """``(C, ceil((y1-y0)/f), ceil((x1-x0)/f))`` means in [0, 1] (every s-th pixel)."""
        s = max(1, f // 4)
        region = self.src.read(slice(y0, y1, s), slice(x0, x1, s))  # (C, h, w)
        return box_mean(region.astype(np.float32) * np.float32(self.scale), f // s)

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

    def pixels(self, level: int, col: int, row: int) -> np.ndarray:
        """A tile's ``(C, h, w)`` float pixels in [0, 1]."""
        f, y0, y1, x0, x1 = self.pyramid.tile_box(level, col, row)
        if f < self.ov_factor:
            return self._read(y0, y1, x0, x1, f)
        o = self.ov_factor
        ov = self.overview()[:, y0 // o:-(-y1 // o), x0 // o:-(-x1 // o)]
        return box_mean(ov, f // o)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """A tile as JPEG (gray or RGB; alpha composited over white)."""
        px = self.pixels(level, col, row)
        c = px.shape[0]
        if c in (2, 4):
            alpha = np.clip(px[-1:], 0, 1)
            px = px[:-1] * alpha + (1 - alpha)
        px = px[:3] if px.shape[0] >= 3 else px[:1]
        out = np.clip(np.nan_to_num(px) * 255 + 0.5, 0, 255).astype(np.uint8)
        if out.shape[0] == 1:
            return _encode("jpeg", out[0], "L")
        return _encode("jpeg", np.ascontiguousarray(np.moveaxis(out, 0, -1)), "RGB")


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of ``(K, ...)`` scores; NaN cells stay NaN.

    >>> softmax(np.array([[0.0], [np.log(3)]])).round(2).tolist()
    [[0.25], [0.75]]
    """
    x = np.asarray(scores, dtype=np.float32)
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def code(p: np.ndarray) -> np.ndarray:
    """Probabilities as bytes: 0 for NaN, else ``1 + round(254 p)``."""
    return np.where(np.isnan(p), 0, 1 + np.rint(np.nan_to_num(p) * 254)).astype(np.uint8)


def decode(c: np.ndarray) -> np.ndarray:
    return np.where(c == 0, np.nan, (c.astype(np.float32) - 1) / 254).astype(np.float32)


class MapTiles:
    """Probability tiles (one pixel per cell) and readout tiles of a ``(K, h, w)`` map.

    Opening it reads the map once, block by block: each class's peak probability (to list
    the classes) and an overview of all classes small enough to keep.

    >>> m = MapTiles(np.zeros((2, 40, 60), np.float32))
    >>> m.peaks.tolist(), m.pyramid.top, len(m.tile(0, 6, 0, 0)) > 0
    ([0.5, 0.5], 6, True)
    """

    def __init__(self, scores):
        self.scores = scores
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

    def _blocks(self, a: int, b: int, c: int, d: int, s: int, align: int):
        """Probabilities of the cells ``[a:b:s, c:d:s]``, a block of about one chunk at a
        time: ``(y, x, (K, bh, bw))`` with ``y, x`` the block's first cell."""
        by = -(-max(self.chunk[0], align, s) // align) * align
        bx = -(-max(self.chunk[1], align, s) // align) * align
        by, bx = -(-by // s) * s, -(-bx // s) * s
        for y in range(a, b, by):
            for x in range(c, d, bx):
                block = np.asarray(self.scores[:, y:min(y + by, b):s, x:min(x + bx, d):s])
                yield y, x, softmax(block)

    def probabilities(self, k: int, a: int, b: int, c: int, d: int, s: int) -> np.ndarray:
        """Class ``k``'s probabilities at the cells ``[a:b:s, c:d:s]``, ``(1, h, w)``."""
        out = np.empty((1, -(-(b - a) // s), -(-(d - c) // s)), np.float32)
        for y, x, p in self._blocks(a, b, c, d, s, align=1):
            oy, ox = (y - a) // s, (x - c) // s
            out[0, oy:oy + p.shape[1], ox:ox + p.shape[2]] = p[k]
        return out

    def tile(self, k: int, level: int, col: int, row: int) -> bytes:
        """Class ``k``'s probability tile as an 8-bit gray PNG of codes (see ``code``)."""
        if not 0 <= k < self.classes:
            raise LookupError(f"no class {k}")
        f, y0, y1, x0, x1 = self.pyramid.tile_box(level, col, row)
        o = self.ov_factor
        if f < o:
            s = max(1, f // 4)
            p = box_mean(self.probabilities(k, y0, y1, x0, x1, s), f // s)
        else:
            p = box_mean(decode(self.overview[k:k + 1, y0 // o:-(-y1 // o),
                                              x0 // o:-(-x1 // o)]), f // o)
        return _encode("png", code(p[0]), "L")

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
