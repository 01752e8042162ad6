"""Where the blocks of a tiled map go: memory or a zarr store.

A sink is the model of MONAI's ``Merger``: tiling hands it each finished block with
``aggregate`` and asks for the result with ``finalize``; it never asks what kind of sink
it writes to. ``done`` holds the blocks a sink already has (a store written by a killed
run), so that a run started again computes only the others.

>>> import numpy as np
>>> from types import SimpleNamespace as Block
>>> sink = open_sink(None, (2, 3, 4), np.float32)
>>> sink.aggregate(Block(index=(0, 1), out=(0, 3, 2, 4)), np.ones((2, 3, 2), np.float32))
>>> sink.finalize()[0, 0].tolist(), sink.done, sink.nan_cells
([0.0, 0.0, 1.0, 1.0], {(0, 1)}, 0)
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .errors import NofcError

__all__ = ["Sink", "MemorySink", "ZarrSink", "open_sink"]

_DONE_DIR = ".nofc_done"  # one empty file per finished chunk, written after the chunk


class Sink:
    """Receives the blocks of a ``(K, h, w)`` map.

    A block comes with its tile: ``tile.index`` ``(by, bx)`` names it, ``tile.out``
    ``(a, b, c, d)`` are its map rows ``a..b-1`` and columns ``c..d-1``.

    Attributes:
        done: indices of the blocks the sink holds (from an earlier run, or aggregated).
        nan_cells: map cells written NaN so far (cells that saw NaN or Inf pixels).
    """

    def __init__(self) -> None:
        self.done: set[tuple[int, int]] = set()
        self.nan_cells = 0

    def aggregate(self, tile, block: np.ndarray) -> None:
        """Take the finished ``(K, b - a, d - c)`` block of ``tile``."""
        self.nan_cells += int(np.isnan(block).any(0).sum())
        self._write(tile, block)
        self.done.add(tile.index)

    def _write(self, tile, block: np.ndarray) -> None:
        raise NotImplementedError

    def finalize(self):
        """The map, once every block is in."""
        raise NotImplementedError


class MemorySink(Sink):
    """The map as a numpy array, for images whose map fits in memory."""

    def __init__(self, shape: tuple[int, int, int], dtype):
        super().__init__()
        self.array = np.zeros(shape, dtype=dtype)

    def _write(self, tile, block):
        a, b, c, d = tile.out
        self.array[:, a:b, c:d] = block

    def finalize(self) -> np.ndarray:
        return self.array


class ZarrSink(Sink):
    """The map in a zarr store, a chunk per block, written as blocks finish.

    The store's ``nofc`` attribute records the run's ``arguments``, their fingerprint,
    the geometry, the nofc version and the caller's ``metadata``. After each chunk an
    empty marker file ``.nofc_done/BY_BX`` is written, so that a killed run resumes; a
    store written for other arguments is refused rather than mixed.
    """

    def __init__(self, path, shape, dtype, *, chunks, geo, arguments: dict, metadata=None):
        super().__init__()
        try:
            import zarr
        except ImportError:  # pragma: no cover
            raise NofcError("out= needs zarr: pip install 'nofc[scale]'") from None
        self.path, self.name = Path(path), str(path)  # the name as given, for messages
        fingerprint = _fingerprint(arguments)
        if self.path.exists():
            self.array = self._reopen(zarr, fingerprint, arguments)
            return
        if not self.path.parent.exists():
            raise NofcError(f"cannot write {self.name}: folder {self.path.parent} does not "
                            "exist")
        from . import __version__

        self.array = zarr.create_array(str(self.path), shape=shape, chunks=(shape[0], *chunks),
                                       dtype=dtype, fill_value=np.nan)
        self.array.attrs["nofc"] = {
            "fingerprint": fingerprint,
            "arguments": arguments,
            "geometry": geo.as_dict(),
            "nofc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"metadata": metadata} if metadata else {}),
        }
        (self.path / _DONE_DIR).mkdir(exist_ok=True)

    def _reopen(self, zarr, fingerprint: str, arguments: dict):
        """The existing store, when it was made with the same arguments; its done blocks."""
        out = self.name
        try:
            arr = zarr.open_array(str(self.path), mode="r+")
        except Exception:  # noqa: BLE001
            raise NofcError(f"{out} exists and is not a nofc zarr map; choose another --out "
                            "or remove it") from None
        old = dict(arr.attrs).get("nofc", {})
        if old.get("fingerprint") != fingerprint:
            diff = [key for key in arguments
                    if old.get("arguments", {}).get(key) != arguments[key]]
            raise NofcError(f"{out} was written for different arguments "
                            f"({', '.join(diff) or 'unknown'}); refusing to mix maps: use "
                            "another --out or delete it")
        done_dir = self.path / _DONE_DIR
        if done_dir.is_dir():
            for f in done_dir.iterdir():
                by, _, bx = f.name.partition("_")
                self.done.add((int(by), int(bx)))
        return arr

    def _write(self, tile, block):
        a, b, c, d = tile.out
        self.array[:, a:b, c:d] = block
        (self.path / _DONE_DIR / f"{tile.index[0]}_{tile.index[1]}").touch()

    def finalize(self):
        return self.array


def open_sink(out, shape: tuple[int, int, int], dtype, *, chunks=None, geo=None,
              arguments=None, metadata: dict | None = None) -> Sink:
    """The sink for ``out``: ``None`` keeps the map in memory, a path is a zarr store.

    Args:
        shape: ``(K, h, w)`` of the map; ``dtype`` its numpy dtype.
        chunks: ``(rows, cols)`` of map cells per block (the store's chunks).
        geo: the network's ``Geometry``, recorded with the map.
        arguments: called (only by sinks that record them: hashing a model takes time)
            for the dict of everything the map depends on; a store made for another is
            refused.
        metadata: anything the caller wants kept with the map (class names, say).
    """
    if out is None:
        return MemorySink(shape, dtype)
    return ZarrSink(out, shape, dtype, chunks=chunks, geo=geo,
                    arguments=arguments() if arguments is not None else {},
                    metadata=metadata)


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
