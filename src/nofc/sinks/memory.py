"""The map as a numpy array, for images whose map fits in memory.

>>> import numpy as np
>>> from types import SimpleNamespace as Block
>>> with MemoryOutput().open(MapFacts((2, 3, 4), np.float32)) as sink:
...     sink.aggregate(Block(index=(0, 1), out=(0, 3, 2, 4)), np.ones((2, 3, 2), np.float32))
>>> sink.finalize()[0, 0].tolist(), sink.done, sink.nan_cells
([0.0, 0.0, 1.0, 1.0], {(0, 1)}, 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import check_memory
from .base import MapFacts, Output, Sink

__all__ = ["MemorySink", "MemoryOutput"]


@dataclass(frozen=True)
class MemoryOutput(Output):
    """The map kept in memory (``out=None``)."""

    def open(self, facts: MapFacts) -> "MemorySink":
        return MemorySink(facts.shape, facts.dtype, facts.blocks)


class MemorySink(Sink):
    """The map as a numpy array, for images whose map fits in memory."""

    def __init__(self, shape: tuple[int, int, int], dtype, blocks: int | None = None):
        super().__init__(blocks)
        check_memory(int(np.prod(shape)) * np.dtype(dtype).itemsize,
                     what=f"the map ({'x'.join(map(str, shape))} {np.dtype(dtype)}) in memory",
                     instead="write it to disk as tiles finish: nofc heatmap --out map.zarr "
                             "(tiled_predict(out='map.zarr'))")
        self.array = np.zeros(shape, dtype=dtype)
        self.shape, self.dtype = self.array.shape, self.array.dtype

    def _cells(self, tile, block):
        a, b, c, d = tile.out
        self.array[:, a:b, c:d] = block

    def finalize(self) -> np.ndarray:
        return self.array
