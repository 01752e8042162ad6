"""Masks: compute only where there is something to see.

``mask=`` is a 2-D array or an image file (nonzero: foreground) of the image's aspect at
any resolution, or ``"auto"``: for a slide (or any picture) tissue is told from glass by
Otsu's threshold on the saturation of a low-resolution level, cleaned by a 3x3 opening and
closing; for a raster it is GDAL's mask (nodata, alpha). A map cell is foreground when the
``step x step`` square it stands for (centred on its window's centre, as in a GeoTIFF of
the map) holds a foreground mask pixel; a tile with no foreground cell is not computed,
and background cells are NaN in the map (nodata in a GeoTIFF).

>>> fg = cell_foreground(np.eye(4, dtype=bool), 8.0, np.array([[[0, 0, 8, 8], [0, 24, 8, 32]]]))
>>> fg.tolist()
[[True, False]]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import NofcError
from .sources import open_source

__all__ = ["resolve_mask", "cell_foreground", "mask_cells", "otsu"]

_AUTO_SIDE = 2048  # longest side of the level "auto" looks at


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (the split with the largest between-class
    variance).

    >>> 0.09 < otsu(np.r_[np.full(50, 0.1), np.full(50, 0.7)]) < 0.7
    True
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    w0 = np.cumsum(p)
    mu = np.cumsum(p * edges[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return float(edges[int(np.nanargmax(between))])


def _shift_any(m: np.ndarray, op) -> np.ndarray:
    """``op`` (np.logical_or: dilation, np.logical_and: erosion) over the 3x3 neighbourhood."""
    p = np.pad(m, 1, mode="edge")
    out = p[1:-1, 1:-1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = op(out, p[dy:dy + m.shape[0], dx:dx + m.shape[1]])
    return out


def tissue(rgb: np.ndarray) -> np.ndarray:
    """Foreground of a ``(3, h, w)`` uint8 or [0, 1] picture: saturation above Otsu's
    threshold, opened then closed with a 3x3 square."""
    x = rgb.astype(np.float64)
    if np.issubdtype(rgb.dtype, np.integer):
        x /= float(np.iinfo(rgb.dtype).max)
    hi, lo = x.max(0), x.min(0)
    sat = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1), 0.0)
    fg = sat > otsu(sat)
    fg = _shift_any(_shift_any(fg, np.logical_and), np.logical_or)  # opening
    return _shift_any(_shift_any(fg, np.logical_or), np.logical_and)  # closing


def resolve_mask(mask, source) -> tuple[np.ndarray, float]:
    """``(bool (h, w) mask, pixels read per mask pixel)`` for ``mask=`` on ``source``."""
    H, W = source.hw
    if isinstance(mask, str) and mask == "auto":
        if hasattr(source, "valid_mask"):
            return source.valid_mask(_AUTO_SIDE)
        picture, per = source.thumbnail(_AUTO_SIDE)
        if picture.shape[0] != 3:
            raise NofcError(f"mask='auto' finds tissue in RGB images; {source.name} has "
                            f"{picture.shape[0]} channels: give a mask array or file")
        return tissue(picture), per
    if isinstance(mask, (str, Path)):
        if not Path(mask).is_file():
            raise NofcError(f"mask file not found: {mask} (give a file, an array or 'auto')")
        m = open_source(mask)
        mask = m.read(slice(None), slice(None)).max(0)
    m = np.asarray(mask)
    if m.ndim != 2:
        raise NofcError(f"a mask is 2-D (rows, columns), got shape {m.shape}")
    h, w = m.shape
    fy, fx = H / h, W / w
    if abs(h * W / H - w) > 1.0 and abs(w * H / W - h) > 1.0:
        raise NofcError(f"the mask is {h}x{w} and the image {H}x{W}: not the same aspect "
                        f"(a {h}x{round(h * W / H)} mask would fit)")
    return m.astype(bool) if m.dtype != np.bool_ else m, float((fy + fx) / 2)


def cell_foreground(mask: np.ndarray, per: float, boxes: np.ndarray) -> np.ndarray:
    """``(h, w)`` bool: whether the box ``boxes[i, j]`` (pixels read) holds foreground
    of ``mask``, one mask pixel per ``per`` pixels read (a summed-area table)."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)
    b = boxes.astype(np.float64) / per
    y0 = np.clip(np.floor(b[..., 0]).astype(np.int64), 0, mask.shape[0])
    x0 = np.clip(np.floor(b[..., 1]).astype(np.int64), 0, mask.shape[1])
    y1 = np.clip(np.ceil(b[..., 2]).astype(np.int64), 0, mask.shape[0])
    x1 = np.clip(np.ceil(b[..., 3]).astype(np.int64), 0, mask.shape[1])
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) > 0


def mask_cells(mask, source, geo, step, map_shape) -> np.ndarray:
    """``(h, w)`` bool: the map cells of ``source`` whose square holds foreground."""
    ys, xs = geo.centers(source.hw, step=step)
    sy, sx = geo.check_step(step)
    squares = np.empty((len(ys), len(xs), 4))
    squares[..., 0], squares[..., 2] = (ys - sy / 2)[:, None], (ys + sy / 2)[:, None]
    squares[..., 1], squares[..., 3] = (xs - sx / 2)[None], (xs + sx / 2)[None]
    fg = cell_foreground(*resolve_mask(mask, source), squares)
    if fg.shape != tuple(map_shape):  # pragma: no cover - a geometry bug
        raise NofcError(f"internal: mask cells {fg.shape} for a map of {map_shape}")
    return fg
