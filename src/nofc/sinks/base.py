"""What every sink is: the model of MONAI's ``Merger``.

Tiling hands a sink each finished block with ``aggregate`` (or, for a block whose image
region cannot be read, ``skip``) and asks for the result with ``finalize``; it never asks
what kind of sink it writes to. ``done`` holds the blocks a sink already has (a store
written by a killed run), so that a run started again computes only the others. A sink is
a context manager: a store is locked against a second writer while it is open.

:class:`MapFacts` is what tiling knows about the map a sink is opened for; the options of
each kind of output travel with its :class:`Output` (``nofc.sinks.output_for``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import NofcError, first_line

__all__ = ["Sink", "FileSink", "MapFacts", "Output"]


@dataclass(frozen=True)
class MapFacts:
    """What tiling knows about the map a sink is opened for.

    Attributes:
        shape: ``(K, h, w)`` of the map; ``dtype`` its numpy dtype.
        chunks: ``(rows, cols)`` of map cells per block (a store's chunks).
        geo: the map's ``Geometry`` (``Geometry.with_edges`` of the image), recorded.
        placement: where the map's cells lie (``nofc.placement``), for GeoTIFF/GeoJSON.
        arguments: called (only by sinks that record them: hashing a model takes time)
            for the dict of everything the map depends on; a store made for another is
            refused.
        metadata: what tiling records with the map (the image's description); an
            output's own ``metadata`` (class names, say) is added by :meth:`Output.kept`.
        blocks: how many blocks the map has, for messages (``holds 5 of 12 blocks``).
    """

    shape: tuple[int, int, int]
    dtype: Any
    chunks: tuple[int, int] | None = None
    geo: Any = None
    placement: Any = None
    arguments: Callable[[], dict] | None = None
    metadata: dict | None = None
    blocks: int | None = None


class Output:
    """Where a map goes and that kind of output's own options; ``open`` makes its sink."""

    path: Any = None
    metadata: dict | None = None

    def kept(self, facts: MapFacts) -> dict:
        """What the map keeps: tiling's facts and this output's ``metadata``."""
        return {**(facts.metadata or {}), **(self.metadata or {})}

    def check(self, *, force: bool = False) -> None:
        """Refuse, before any work, an output that exists and would be replaced."""

    def open(self, facts: MapFacts) -> "Sink":
        raise NotImplementedError


class Sink:
    """Receives the blocks of a ``(K, h, w)`` map.

    A block comes with its tile: ``tile.index`` ``(by, bx)`` names it, ``tile.out``
    ``(a, b, c, d)`` are its map rows ``a..b-1`` and columns ``c..d-1``.

    Attributes:
        done: indices of the blocks the sink holds (from an earlier run, or aggregated).
        nan_cells: map cells written NaN so far (cells that saw NaN or Inf pixels).
        bad: ``{index: why}`` for the blocks left NaN because their region was unreadable.
        blocks: how many blocks the whole map has (for messages), when known.
    """

    def __init__(self, blocks: int | None = None) -> None:
        self.done: set[tuple[int, int]] = set()
        self.nan_cells = 0
        self.bad: dict[tuple[int, int], str] = {}
        self.blocks = blocks

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def aggregate(self, tile, block: np.ndarray) -> None:
        """Take the finished ``(K, b - a, d - c)`` block of ``tile``."""
        self._write(tile, block)
        self.nan_cells += int(np.isnan(block).any(0).sum())
        self.done.add(tile.index)
        if self.bad.pop(tile.index, None) is not None:
            self._bad_changed()

    def skip(self, tile, why: str) -> None:
        """Leave the block of ``tile`` NaN (its image region is unreadable) and record
        ``why``; it is not ``done``, so a later run tries it again."""
        a, b, c, d = tile.out
        self._cells(tile, np.full((self.shape[0], b - a, d - c), np.nan, self.dtype))
        self.bad[tile.index] = why
        self._bad_changed()

    def resume_note(self) -> str:
        """What a run that stops now leaves behind, for the message that stops it."""
        return "nothing was kept (out= a zarr store keeps finished blocks for a rerun)"

    def _write(self, tile, block: np.ndarray) -> None:
        self._cells(tile, block)

    def _cells(self, tile, block: np.ndarray) -> None:
        raise NotImplementedError

    def _bad_changed(self) -> None:
        """Persist ``bad`` (stores keep it in their attributes)."""

    def close(self) -> None:
        """Let go of the output (a store's lock); the map stays readable."""

    def finalize(self):
        """The map, once every block is in."""
        raise NotImplementedError


def temporary(path: Path) -> Path:
    """Where an output is written until it is complete (same folder: rename is atomic)."""
    if not path.parent.is_dir():
        raise NofcError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise NofcError(f"{path} is a folder; choose another output")
    return path.with_name(f".{path.name}.nofc-partial{path.suffix}")


class FileSink(Sink):
    """A sink writing one file through a temporary one; removed when the run fails."""

    def __init__(self, path, shape, dtype, blocks=None):
        super().__init__(blocks)
        self.path = Path(path)
        self.tmp = temporary(self.path)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is not None:
            self._abort()

    def _abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def _op(self, op, what: str):
        try:
            return op()
        except OSError as exc:
            self._abort()
            raise NofcError(f"cannot write {what} to {self.path}: "
                            f"{exc.strerror or first_line(exc)}; nothing was kept") from None

    def _publish(self) -> None:
        self._op(lambda: os.replace(self.tmp, self.path), "the finished file")
