"""The map in a zarr store, a chunk per block, written as blocks finish; resumable."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ..errors import NofcError, first_line
from .base import MapFacts, Output, Sink

__all__ = ["ZarrSink", "ZarrOutput"]

_DONE_DIR = ".nofc_done"  # one empty file per finished chunk, written after the chunk
_LOCK = ".nofc_lock"  # {"pid", "host", "started"} of the run writing the store
_OWN = {_DONE_DIR, _LOCK}  # what a store folder holds before its array is made
_NEW = ".nofc_new."  # + a random name: the array's metadata, made before it goes in place
_HELD: dict[str, int] = {}  # locks this process holds, and how many of its sinks share each
_STALE_AFTER = 60.0  # seconds: a lock's temporary file older than this is a killed run's


def _reached(step: str) -> None:
    """Each step of a store's creation calls this; tests kill the process here."""


def _leftover(name: str) -> bool:
    """What a run killed while it made or wrote the store may leave in its folder: the
    temporary files of a lock, a half-made array's metadata, a chunk's ``.partial``."""
    return (name.startswith(f"{_LOCK}.") and name.endswith((".tmp", ".stale"))
            or name.startswith(_NEW) or name.endswith(".partial"))



@dataclass(frozen=True)
class ZarrOutput(Output):
    """A zarr store (``.zarr``): resumable, so an existing one is reopened, not refused."""

    path: str | os.PathLike
    metadata: dict | None = None  # kept with the map (``{"classes": [...]}`` names bands)

    def open(self, facts: MapFacts) -> "ZarrSink":
        return ZarrSink(self.path, facts.shape, facts.dtype, chunks=facts.chunks, geo=facts.geo,
                        arguments=facts.arguments() if facts.arguments is not None else {},
                        metadata=self.kept(facts), blocks=facts.blocks)


def _version() -> str:
    try:
        return version("nofc")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


class ZarrSink(Sink):
    """The map in a zarr store, a chunk per block, written as blocks finish.

    The store's ``nofc`` attribute records the run's ``arguments``, their fingerprint,
    the geometry, the nofc version, the caller's ``metadata`` and the ``bad_blocks`` left
    NaN. After each chunk an empty marker file ``.nofc_done/BY_BX`` is written, so that a
    killed run resumes; a store written for other arguments is refused rather than mixed.
    While open, the store holds a lock file ``.nofc_lock`` (process id and host): a second
    run on the same store is refused, and the lock of a run that died on this host is
    taken over. A write that fails (disk full) stops the run with one line; every block
    finished before it is kept.
    """

    def __init__(self, path, shape, dtype, *, chunks, geo, arguments: dict, metadata=None,
                 blocks: int | None = None):
        super().__init__(blocks)
        try:
            import zarr
        except ImportError:  # pragma: no cover
            raise NofcError("out= needs zarr: pip install 'nofc[scale]'") from None
        self.path, self.name = Path(path), str(path)  # the name as given, for messages
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        fingerprint = _fingerprint(arguments)
        self._folder()
        self.lock = _StoreLock(self.path / _LOCK, self.name)
        made = (zarr, chunks, fingerprint, arguments, geo, metadata)
        try:  # under the lock: whether the array exists cannot change any more
            if self.lock.first:  # no other sink of this process is writing here
                self._clean()
            if {p.name for p in self.path.iterdir() if not _leftover(p.name)} <= _OWN:
                self.array = self._create(*made)
            else:
                self.array = self._reopen(zarr, fingerprint, arguments, made)
        except BaseException:
            self.lock.release()
            raise

    def _clean(self) -> None:
        """Remove what killed runs left (see ``_leftover``): the lock is held, so nothing
        else writes here, except a run trying to lock just now (its lock's temporary file:
        removed only when its process is gone)."""
        try:
            for p in self.path.iterdir():
                if not _leftover(p.name):
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif not p.name.startswith(_LOCK) or _killed(p):
                    p.unlink(missing_ok=True)
            if (self.path / "c").is_dir():
                for p in (self.path / "c").rglob("*.partial"):  # a chunk killed mid-write
                    p.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - a store that cannot be cleaned still resumes
            pass

    def _folder(self) -> None:
        """Check the path and make the store's folder (the array is made under the lock)."""
        out = self.name
        if self.path.exists():
            if not self.path.is_dir():
                raise NofcError(f"{out} exists and is not a nofc zarr map; choose another "
                                "--out or remove it")
            return
        if not self.path.parent.exists():
            raise NofcError(f"cannot write {out}: folder {self.path.parent} does not exist")
        try:
            self.path.mkdir()
            _reached("folder")
        except FileExistsError:  # another run made it just now: the lock decides
            pass
        except OSError as exc:
            raise NofcError(f"cannot write {out}: {exc.strerror or first_line(exc)}") from None

    def _create(self, zarr, chunks, fingerprint: str, arguments: dict, geo, metadata):
        """Make the array atomically: its complete metadata (``zarr.json`` with the
        ``nofc`` attributes) is written under a temporary name and renamed into place
        last, so a run killed at any instant leaves either no array (made again) or one
        that resumes; the markers' folder is made first."""
        if any((self.path / _DONE_DIR).glob("*")):
            raise NofcError(f"{self.name} has finished-block markers but no array; remove it")
        new = self.path / f"{_NEW}{uuid.uuid4().hex[:8]}"
        try:
            (self.path / _DONE_DIR).mkdir(exist_ok=True)
            _reached("markers")
            zarr.create_array(str(new), shape=self.shape, chunks=(self.shape[0], *chunks),
                              dtype=self.dtype, fill_value=np.nan, attributes={"nofc": {
                                  "fingerprint": fingerprint,
                                  "arguments": arguments,
                                  "geometry": geo.as_dict() if geo is not None else None,
                                  "nofc_version": _version(),
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                           time.gmtime()),
                                  **({"metadata": metadata} if metadata else {}),
                              }})
            _reached("metadata")
            os.replace(new / "zarr.json", self.path / "zarr.json")  # the array exists now
            _reached("array")
            shutil.rmtree(new, ignore_errors=True)
            return zarr.open_array(str(self.path), mode="r+")
        except OSError as exc:
            shutil.rmtree(new, ignore_errors=True)
            raise NofcError(f"cannot create {self.name}: {exc.strerror or first_line(exc)}"
                            ) from None

    def _reopen(self, zarr, fingerprint: str, arguments: dict, made: tuple):
        """The existing store, when it was made with the same arguments; its done blocks."""
        out = self.name
        try:
            arr = zarr.open_array(str(self.path), mode="r+")
        except Exception:  # noqa: BLE001
            raise NofcError(f"{out} exists and is not a nofc zarr map; choose another --out "
                            "or remove it") from None
        old = dict(arr.attrs).get("nofc")
        if old is None and not self._written():
            # an array whose attributes never came (an older nofc wrote them after the
            # array and was killed in between): nothing was written to it, so made again
            (self.path / "zarr.json").unlink()
            return self._create(*made)
        old = old or {}
        if old.get("fingerprint") != fingerprint:
            before = old.get("arguments", {})
            diff = [key for key in sorted(set(arguments) | set(before))
                    if before.get(key) != arguments.get(key)]
            raise NofcError(f"{out} was written for different arguments "
                            f"({', '.join(diff) or 'unknown'}); refusing to mix maps: use "
                            "another --out or delete it")
        done_dir = self.path / _DONE_DIR
        if not done_dir.is_dir():  # a store made by an older nofc, killed before it
            self._store_op(done_dir.mkdir, "the finished-block markers' folder")
        if done_dir.is_dir():
            for f in done_dir.iterdir():
                by, _, bx = f.name.partition("_")
                self.done.add((int(by), int(bx)))
        self.bad = {tuple(e["block"]): e["error"] for e in old.get("bad_blocks", [])}
        return arr

    def _written(self) -> bool:
        """Whether any block of the map was written (a chunk, or a marker)."""
        chunks = self.path / "c"
        return (chunks.is_dir() and any(p.is_file() for p in chunks.rglob("*"))
                or any((self.path / _DONE_DIR).glob("*")))

    def _write(self, tile, block):
        self._cells(tile, block)
        marker = self.path / _DONE_DIR / f"{tile.index[0]}_{tile.index[1]}"
        self._store_op(marker.touch, f"block {tile.index}")

    def _cells(self, tile, block):
        a, b, c, d = tile.out
        self._store_op(lambda: self.array.__setitem__((slice(None), slice(a, b), slice(c, d)),
                                                      block), f"block {tile.index}")

    def _store_op(self, op, what: str) -> None:
        """Run a write; a failure (disk full, store gone read-only) is one line."""
        try:
            op()
        except OSError as exc:
            raise NofcError(f"cannot write {what} to {self.name}: "
                            f"{exc.strerror or first_line(exc)}; {self.resume_note()}"
                            ) from None

    def _bad_changed(self) -> None:
        meta = dict(self.array.attrs).get("nofc", {})
        meta["bad_blocks"] = [{"block": list(i), "error": why}
                              for i, why in sorted(self.bad.items())]
        self._store_op(lambda: self.array.update_attributes({"nofc": meta}),
                       "the list of bad blocks")

    def resume_note(self) -> str:
        of = f" of {self.blocks}" if self.blocks else ""
        return (f"{self.name} holds {len(self.done)}{of} blocks; the same call resumes from "
                "there")

    def close(self) -> None:
        self.lock.release()

    def finalize(self):
        return self.array


class _StoreLock:
    """An exclusive lock file holding ``{"pid", "host", "started"}``.

    Made complete under a temporary name and hard-linked into place, so that it exists
    only with its content and only one of two runs can make it. A lock whose process is
    gone (same host, no such process) is stale and taken over; one from another host is
    refused, since its process cannot be checked from here. Sinks of one process share
    its lock (the file goes when the last lets go).
    """

    def __init__(self, path: Path, store: str):
        self.path, self.store, self.held, self.first = path, store, False, False
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        key = str(self.path.resolve())
        for _ in range(3):
            if _HELD.get(key) or self._link(json.dumps(me).encode()):
                self.held, self.first = True, not _HELD.get(key)
                _HELD[key] = _HELD.get(key, 0) + 1
                return
            holder = self._holder()
            if not self._stale(holder) or not self._take_over(holder):
                break
        raise NofcError(f"{store} is being written by another run ({_describe(holder)}); "
                        f"refusing a second writer: wait for it, or, if that run is dead, "
                        f"delete {self.path}")

    def _link(self, content: bytes) -> bool:
        tmp = self.path.with_name(f"{_LOCK}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(content)
            _reached("lock")
            os.link(tmp, self.path)
            _reached("locked")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise NofcError(f"cannot lock {self.store}: {exc.strerror or first_line(exc)}"
                            ) from None
        finally:
            with contextlib.suppress(OSError):  # a store gone read-only: a stale file
                tmp.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}  # released just now: try again
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder) -> bool:
        if holder == {}:
            return True
        if not holder or holder.get("host") != socket.gethostname():
            return False
        if holder.get("pid") == os.getpid():
            return True  # not held here (see _HELD): a dead process's reused pid
        return _gone(holder)

    def _take_over(self, holder) -> bool:
        """Move the stale lock aside; True when what was moved is the lock judged stale
        (had another run taken it over first, its fresh lock is put back)."""
        if holder == {}:
            return True
        aside = self.path.with_name(f"{_LOCK}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            if json.loads(aside.read_bytes()) == holder:
                return True
            os.link(aside, self.path)  # not the stale one: give it back
            return False
        except (OSError, ValueError):
            return False
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.held = False
            key = str(self.path.resolve())
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
                # a store gone read-only (or away) keeps the lock: a stale one, since this
                # process ends or lets go, taken over by the next run
                with contextlib.suppress(OSError):
                    self.path.unlink(missing_ok=True)


def _gone(holder: dict) -> bool:
    """Whether the process a lock names is known to be gone (same host, no such pid)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError, OverflowError):
        return False
    return False


def _killed(tmp: Path) -> bool:
    """Whether a lock's temporary file is a killed run's: its process gone, or (another
    host's, or unreadable) older than ``_STALE_AFTER``."""
    try:
        holder = json.loads(tmp.read_bytes())
        if isinstance(holder, dict) and holder.get("pid") != os.getpid() and _gone(holder):
            return True
    except (OSError, ValueError):
        pass
    try:
        return time.time() - tmp.lstat().st_mtime > _STALE_AFTER
    except OSError:
        return False


def _describe(holder) -> str:
    """``pid 123 on host h since 2026-...`` for a lock's content."""
    if not holder:
        return "a lock file nofc cannot read"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('started')}")


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
