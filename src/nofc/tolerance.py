"""The one numeric rule for "equal", and the report of a check against it
(:class:`VerifyReport`): used by ``verify``, by ``verify_onnx``, by the check that every
conversion made for the user passes before its map is trusted, and by measured geometry.

In float64 the rule is absolute for outputs up to 1 and relative beyond (random-weight
logits can reach 1e12: inception_v3, hrnet_w18); in float32 it is relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_TOL", "passes", "tolerance_text", "tolerance_for", "VerifyReport"]

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


@dataclass
class VerifyReport:
    """What verify() measured.

    ``max_rel_error`` is normwise: ``max |a - b| / max |a|`` over the batch, which stays
    meaningful when single logits are close to zero.
    """

    max_abs_error: float
    max_rel_error: float
    dtype: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    tolerance: str
    ok: bool
    # verify(..., image=...): map cells compared with crops; exact is what geometry claims
    cells: int = 0
    exact: bool | None = None
    reasons: tuple[str, ...] = ()
    note: str = ""  # why a mismatch may not be the conversion's (a float32 op in float64)

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        if self.cells and self.exact is False:
            verdict = "NOT EXACT (measured)"
        text = (f"{verdict}: {self.dtype} input {tuple(self.input_shape)}, output "
                f"{tuple(self.output_shape)}: max abs error {self.max_abs_error:.3g}, "
                f"max rel error {self.max_rel_error:.3g} (tolerance {self.tolerance})")
        if self.cells:
            text += f"; {self.cells} map cells vs the classifier on their crops"
            if self.exact is False and self.reasons:
                more = f" and {len(self.reasons) - 1} more" if len(self.reasons) > 1 else ""
                text += f"; cells near borders differ because {self.reasons[0]}{more}"
        if self.note:
            text += f"; {self.note}"
        return text
