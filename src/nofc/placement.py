"""Where a map lies: its cells in level-0 slide pixels or in world coordinates.

A map computed on the pixels an :class:`nofc.sources.ImageSource` reads (a slide's level,
a raster) has cell ``(i, j)``'s window at ``Geometry.boxes`` in those pixels. A
:class:`Placement` adds what the source knows: the ``downsample`` of the level read (one
pixel read spans that many level-0 pixels) and, for rasters, the affine ``transform`` of
the pixels read and their ``crs``. Cell ``(i, j)`` stands for the ``step x step`` square
centred on its window's centre (pixel-is-area), so the map is itself a raster whose
affine is :meth:`Placement.cell_transform`: cell ``(col, row)`` -> ``(x, y)`` in level-0
slide pixels, or in world coordinates when the source has a transform.

>>> import nofc
>>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
>>> Placement(geo, (4, 4), downsample=(2.0, 2.0)).cell_transform()
(8.0, 0.0, 28.0, 0.0, 8.0, 28.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Placement", "placement_of"]


@dataclass(frozen=True)
class Placement:
    """The geometry of a map, the step it was computed at, and where its pixels lie."""

    geo: object  # nofc.Geometry
    step: tuple[int, int]
    downsample: tuple[float, float] = (1.0, 1.0)
    transform: tuple | None = None  # GDAL-order affine of the pixels read, or None
    crs: str | None = None
    mpp: tuple[float, float] | None = None  # (y, x) microns per level-0 pixel, when known

    def boxes(self, image_hw) -> np.ndarray:
        """``(h, w, 4)`` float windows ``(y0, x0, y1, x1)`` in level-0 pixels."""
        b = self.geo.boxes(image_hw, step=self.step).astype(np.float64)
        dy, dx = self.downsample
        return b * np.array([dy, dx, dy, dx])

    def pixel_transform(self) -> tuple:
        """Affine ``(a, b, c, d, e, f)`` of the map's cells in the pixels read:
        ``x = a*col + b*row + c``, ``y = d*col + e*row + f`` (cell corners)."""
        sy, sx = self.step
        cy0 = self.geo.offset[0] + self.geo.window[0] / 2 - sy / 2
        cx0 = self.geo.offset[1] + self.geo.window[1] / 2 - sx / 2
        return (float(sx), 0.0, float(cx0), 0.0, float(sy), float(cy0))

    def cell_transform(self) -> tuple:
        """Affine of the map's cells in level-0 slide pixels, or in world coordinates
        when the source has a ``transform`` (then composed with it)."""
        a, b, c, d, e, f = self.pixel_transform()
        dy, dx = self.downsample
        a, c, e, f = a * dx, c * dx, e * dy, f * dy
        if self.transform is None:
            return (a, b, c, d, e, f)
        return _compose(self.transform, (a, b, c, d, e, f))

    def cell_area(self) -> tuple[float, str]:
        """``(area, unit)`` of one cell: in µm² for a slide whose pixel size is known,
        else in level-0 pixels² or, for a scene, its map units².

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> Placement(geo, (4, 4), mpp=(0.25, 0.25)).cell_area()
        (1.0, 'µm²')
        """
        if self.transform is None and self.mpp is not None:
            y, x = self.cell_microns()
            return y * x, "µm²"
        a, b, _, d, e, _ = self.cell_transform()
        area = abs(a * e - b * d)
        return area, (_units(self.crs) if self.transform is not None else "px²")

    def cell_microns(self) -> tuple[float, float] | None:
        """``(y, x)`` size of a map cell in microns (a slide that records its pixel
        size), else None.

        >>> import nofc
        >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
        >>> Placement(geo, (4, 4), downsample=(2.0, 2.0), mpp=(0.25, 0.25)).cell_microns()
        (2.0, 2.0)
        """
        if self.mpp is None:
            return None
        a, _, _, _, e, _ = self.cell_transform()
        return (abs(e) * self.mpp[0], abs(a) * self.mpp[1])

    def as_dict(self) -> dict:
        """Plain Python, for a store's metadata."""
        return {"step": list(self.step), "downsample": list(self.downsample),
                "cell_transform": list(self.cell_transform()), "crs": self.crs,
                "coordinates": "world" if self.transform is not None else "level-0 pixels",
                **({"mpp": list(self.mpp), "cell_microns": list(self.cell_microns())}
                   if self.mpp is not None else {})}


def _units(crs: str | None) -> str:
    """The unit of areas in a scene's CRS: ``m²``, ``degree²``, ``US survey foot²``..."""
    if not crs:
        return "map units²"
    from rasterio.crs import CRS  # a scene was read by rasterio: it is there

    crs = CRS.from_user_input(crs)
    unit = "degree" if crs.is_geographic else crs.linear_units
    return {"metre": "m", "meter": "m"}.get(unit, unit) + "²"


def _compose(outer, inner) -> tuple:
    """``outer`` after ``inner``, both GDAL-order affines.

    >>> _compose((10, 0, 500, 0, -10, 900), (2, 0, 1, 0, 2, 1))
    (20, 0, 510, 0, -20, 890)
    """
    a1, b1, c1, d1, e1, f1 = outer
    a2, b2, c2, d2, e2, f2 = inner
    return (a1 * a2 + b1 * d2, a1 * b2 + b1 * e2, a1 * c2 + b1 * f2 + c1,
            d1 * a2 + e1 * d2, d1 * b2 + e1 * e2, d1 * c2 + e1 * f2 + f1)


def placement_of(source, geo, step) -> Placement:
    """The placement of a map of ``source`` (an ImageSource, or anything without
    ``downsample``/``transform``: level-0 = the pixels read). A source's ``mpp`` (of the
    pixels read) becomes level-0 microns per pixel; rasters have none (their transform
    says where they lie)."""
    down = tuple(getattr(source, "downsample", (1.0, 1.0)))
    mpp = getattr(source, "mpp", None)
    transform = getattr(source, "transform", None)
    mpp0 = None if mpp is None or transform is not None else \
        (float(mpp[0]) / down[0], float(mpp[1]) / down[1])
    return Placement(geo, tuple(step), down, transform, getattr(source, "crs", None), mpp0)
