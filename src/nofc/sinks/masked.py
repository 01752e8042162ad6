"""A sink whose background cells are NaN (``nofc.masks`` says which cells are)."""

from __future__ import annotations

import numpy as np

__all__ = ["MaskedSink"]


class MaskedSink:
    """A sink whose background cells are NaN; tiles without foreground go in as NaN
    without being computed (:meth:`fill`). Counts cells it blanked apart from cells that
    saw NaN pixels."""

    def __init__(self, sink, foreground: np.ndarray):
        self.sink, self.fg, self.blank = sink, foreground, 0

    def __getattr__(self, name):
        return getattr(self.sink, name)

    def __enter__(self):
        self.sink.__enter__()
        return self

    def __exit__(self, *exc):
        return self.sink.__exit__(*exc)

    def plan(self, todo: list) -> list:
        """The tiles of ``todo`` with foreground; the others go in as NaN (:meth:`fill`)."""
        keep = []
        for t in todo:
            a, b, c, d = t.out
            if self.fg[a:b, c:d].any():
                keep.append(t)
            else:
                self.fill(t)
        return keep

    def aggregate(self, tile, block: np.ndarray) -> None:
        a, b, c, d = tile.out
        off = ~self.fg[a:b, c:d]
        block = np.array(block, copy=True)
        block[:, off] = np.nan
        self.blank += int(off.sum())
        self.sink.aggregate(tile, block)

    def fill(self, tile) -> None:
        """The block of a tile without foreground: NaN, not computed."""
        a, b, c, d = tile.out
        self.blank += (b - a) * (d - c)
        self.sink.aggregate(tile, np.full((self.sink.shape[0], b - a, d - c), np.nan,
                                          self.sink.dtype))

    @property
    def nan_cells(self) -> int:
        return self.sink.nan_cells - self.blank
