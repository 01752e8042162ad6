"""The one exception type nofc raises for bad input, and the checks that raise it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["NofcError"]


class NofcError(ValueError):
    """Something about the model, the image or the options cannot work.

    The message names what was found and, where possible, what would fit.

    >>> issubclass(NofcError, ValueError)
    True
    """


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name.

    >>> first_line(RuntimeError("shape mismatch\\n  at layer 3"))
    'shape mismatch'
    >>> first_line(AssertionError()), first_line(KeyError())
    ('an assert without a message', 'KeyError')
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return "an assert without a message" if isinstance(exc, AssertionError) else \
        type(exc).__name__


def refuse_overwrite(path: str | os.PathLike, *, force: bool) -> None:
    """Raise when ``path`` exists and ``force`` is not set (before any slow work).

    >>> refuse_overwrite("/", force=True)
    >>> refuse_overwrite("/", force=False)
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: / exists; pass --force to overwrite it
    """
    if Path(path).exists() and not force:
        raise NofcError(f"{path} exists; pass --force to overwrite it")


def check_input_size(input_size) -> tuple[int, int, int]:
    """``(C, H, W)`` as three positive ints, or a NofcError saying what was given.

    >>> check_input_size([3, 224, 224])
    (3, 224, 224)
    """
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise NofcError(f"input_size must be (C, H, W) integers, got {input_size!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise NofcError(f"input_size must be three positive integers (C, H, W), got {input_size!r}")
    return size  # type: ignore[return-value]


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any slow work, an output whose folder is missing or refuses files.

    A file is really created and removed: root passes ``os.access`` on read-only mounts.

    >>> check_writable("/no/such/folder/map.png")
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: cannot write /no/such/folder/map.png: folder /no/such/folder does not exist
    """
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise NofcError(f"cannot write {target}: folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise NofcError(f"cannot write {target}: folder {folder} is not writable "
                        f"({exc.strerror or first_line(exc)})") from None


def size_text(nbytes: float) -> str:
    """Bytes as people read them.

    >>> size_text(2.5e12), size_text(1536), size_text(12)
    ('2.27 TiB', '1.50 KiB', '12 bytes')
    """
    if nbytes < 1024:
        return f"{int(nbytes)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def available_memory() -> int:
    """Bytes of memory this process can still take (free plus reclaimable caches)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unreadable /proc: free pages
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(nbytes: int, *, what: str, instead: str) -> None:
    """Refuse, before allocating, ``what`` when its ``nbytes`` exceed the memory available;
    the message ends with ``instead``, what would fit.

    >>> check_memory(1 << 62, what="the map", instead="write it to disk")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: the map needs 4096.00 PiB of memory and ... is available; write it to disk
    """
    available = available_memory()
    if nbytes > available:
        raise NofcError(f"{what} needs {size_text(nbytes)} of memory and "
                        f"{size_text(available)} is available; {instead}")


def call_model(net, x, *, run=None):
    """``run()`` (default ``net(x)``), with an error raised inside the network ``net`` given
    ``x`` as one NofcError line naming the network, the input it failed on and the first
    line of the error (the traceback stays on it as ``__cause__``: ``nofc --debug`` prints
    it). A NofcError passes unchanged.

    >>> class Broken:
    ...     def __call__(self, x):
    ...         raise ValueError("no")
    >>> import torch
    >>> call_model(Broken(), torch.zeros(1, 3, 8, 8))
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: the model Broken failed on an input of 1x3x8x8 (float32 on cpu): ValueError: no; nofc --debug (or NOFC_DEBUG=1) shows the traceback
    """
    try:
        return net(x) if run is None else run()
    except NofcError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model raises anything
        raise NofcError(f"the model {type(net).__name__} failed on an input of "
                        f"{'x'.join(map(str, x.shape))} ({str(x.dtype).replace('torch.', '')} "
                        f"on {x.device}): {type(exc).__name__}: {first_line(exc)}; "
                        "nofc --debug (or NOFC_DEBUG=1) shows the traceback") from exc
