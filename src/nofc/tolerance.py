"""The one numeric rule for "equal": used by ``verify``, by the check that every
conversion made for the user passes before its map is trusted, and by measured geometry.

In float64 the rule is absolute for outputs up to 1 and relative beyond (random-weight
logits can reach 1e12: inception_v3, hrnet_w18); in float32 it is relative.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_TOL", "passes", "tolerance_text", "tolerance_for"]

DEFAULT_TOL = {torch.float64: ("abs", 1e-10), torch.float32: ("rel", 1e-4)}


def tolerance_for(dtype: torch.dtype) -> tuple[str, float]:
    """``(kind, tol)`` for ``dtype``: float64's rule for float64, else float32's.

    >>> tolerance_for(torch.float64), tolerance_for(torch.bfloat16)
    (('abs', 1e-10), ('rel', 0.0001))
    """
    return DEFAULT_TOL.get(dtype, DEFAULT_TOL[torch.float32])


def passes(kind: str, tol: float, max_abs: float, scale: float) -> bool:
    """The tolerance rule: ``abs`` is ``max_abs <= tol * max(1, scale)``, ``rel`` is
    ``max_abs <= tol * scale`` (``scale`` = max |reference|).

    An absolute bound alone fails networks whose random-weight logits reach 1e12
    (inception_v3, hrnet_w18) although they agree to the last bits of float64.

    >>> passes("abs", 1e-10, 1e-3, 2.5e12), passes("abs", 1e-10, 1e-9, 0.5)
    (True, False)
    """
    if kind == "abs":
        return max_abs <= tol * max(1.0, scale)
    return max_abs <= tol * scale if scale > 0 else max_abs <= tol


def tolerance_text(kind: str, tol: float) -> str:
    """The rule in words, for reports.

    >>> tolerance_text("abs", 1e-10), tolerance_text("rel", 1e-4)
    ('abs 1e-10 x max(1, max|ref|)', 'rel 0.0001')
    """
    return f"abs {tol:g} x max(1, max|ref|)" if kind == "abs" else f"rel {tol:g}"
