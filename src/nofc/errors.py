"""The one exception type nofc raises for bad input, and the checks that raise it."""

from __future__ import annotations

import os
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
