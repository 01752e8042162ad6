"""Numerical equivalence of a classifier and its fully convolutional form."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._fx import param_like
from .conversion import as_fcn
from .dense import as_batch, dense_predict, sliding_window_predict
from .errors import NofcError, check_input_size
from .tolerance import DEFAULT_TOL, VerifyReport, passes, tolerance_text
from .receptive import cached_geometry

__all__ = ["verify", "VerifyReport"]  # the report lives with the rule: nofc.tolerance

def _run(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = copy.deepcopy(model).to(device=x.device, dtype=dtype).eval()
    with torch.no_grad():  # a copy: a model may write into its input (x.sub_(mean))
        return m(x.to(dtype, copy=True))


def verify(
    model: nn.Module,
    fcn: nn.Module,
    input_size,
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    seed: int = 0,
    tolerance: float | None = None,
    device: str | torch.device | None = None,
    image=None,
) -> VerifyReport:
    """Run ``model`` and ``fcn`` on the same random batch at the reference size.

    Both are copied (the originals are not touched) and cast to ``dtype``. The default
    tolerance is, in float64, ``max abs error <= 1e-10 * max(1, max |reference output|)``
    (absolute for logits up to 1, relative beyond: random-weight logits can reach 1e12)
    and, in float32, ``max abs error <= 1e-4 * max |reference output|``.

    >>> import torch, torchvision, nofc
    >>> m = torchvision.models.resnet18()
    >>> fcn = nofc.convert(m, input_size=(3, 64, 64))
    >>> nofc.verify(m, fcn, input_size=(3, 64, 64)).ok
    True

    With ``image`` (``(C, H, W)`` or ``(B, C, H, W)``), the dense map of ``fcn`` over the
    image is compared cell by cell with ``model`` run on each cell's crop (see
    ``nofc.geometry``); for networks with padding the report gives the measured
    difference and ``exact=False`` instead of claiming equality.

    >>> r = nofc.verify(m, fcn, (3, 64, 64), image=torch.randn(3, 96, 96))
    >>> r.cells, r.exact
    (4, False)
    """
    size = check_input_size(input_size)
    if dtype not in DEFAULT_TOL:
        raise NofcError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    kind, default = DEFAULT_TOL[dtype]
    tol = default if tolerance is None else float(tolerance)
    if image is not None:
        return _verify_image(model, fcn, size, image, dtype, device, kind, tol)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *size), generator=gen, dtype=torch.float64)
    if device is None:
        device = param_like(model)[0]
    x = x.to(device)
    a = _run(model, x, dtype)
    b = _run(fcn, x, dtype)
    if a.dim() == 2 and b.dim() == 4 and b.shape[2:] == (1, 1):
        b2 = b.flatten(1)
    else:
        b2 = b
    if a.shape != b2.shape:
        raise NofcError(f"outputs differ in shape at the reference size: model gives "
                        f"{tuple(a.shape)}, fcn gives {tuple(b.shape)}")
    diff = (a - b2).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    ok = passes(kind, tol, max_abs, scale) and bool(
        torch.isfinite(b2).all() == torch.isfinite(a).all())
    note = "" if ok or dtype != torch.float64 else _lower_precision(model, x)
    return VerifyReport(max_abs, max_rel, str(dtype).replace("torch.", ""), tuple(x.shape),
                        tuple(b.shape), tolerance_text(kind, tol), ok, note=note)


class _LowerPrecision(TorchDispatchMode):
    """Records the first op that takes or gives a float32 or half tensor in a float64 run
    (a constant made in the forward, or a plain tensor attribute ``.double()`` leaves)."""

    def __init__(self):
        super().__init__()
        self.first = None
        self.where: list[str] = []  # the modules whose forward is running

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = [*(out if isinstance(out, (tuple, list)) else (out,)), *args]
        if self.first is None and any(
                isinstance(t, torch.Tensor) and t.dtype in _LOWER for t in seen):
            op = func.overloadpacket.__name__
            what = {"lift_fresh": "a float32 constant", "lift_fresh_copy": "a float32 "
                    "constant", "_to_copy": "a cast"}.get(op, f"op {op}")
            place = f"module '{self.where[-1]}'" if self.where else "the model's own forward"
            self.first = f"{what} in {place}"
        return out


_LOWER = (torch.float32, torch.float16, torch.bfloat16)


def _lower_precision(model: nn.Module, x: torch.Tensor) -> str:
    """A note when ``model`` in float64 still computes something in lower precision
    (a float32 constant or cast made in its forward): float64's tolerance is then out of
    reach for reasons that are the model's, not the conversion's.

    >>> import torch
    >>> class Casts(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * torch.tensor(0.1, dtype=torch.float32).to(x.dtype)
    >>> _lower_precision(Casts(), torch.ones(1, dtype=torch.float64))[:60]
    'the model computes in float32 inside its forward even in flo'
    """
    mode = _LowerPrecision()
    m = copy.deepcopy(model).to(device=x.device, dtype=torch.float64).eval()
    for name, sub in m.named_modules():
        if name:
            sub.register_forward_pre_hook(lambda *_, name=name: mode.where.append(name))
            sub.register_forward_hook(lambda *_: mode.where.pop() and None)
    with torch.no_grad(), mode:
        m(x.to(torch.float64))
    if mode.first is None:
        return ""
    return (f"the model computes in float32 inside its forward even in float64 (first: "
            f"{mode.first}), so float64's tolerance is out of reach; compare in float32 "
            "(dtype=torch.float32)")


def _verify_image(model, fcn, size, image, dtype, device, kind, tol) -> VerifyReport:
    """verify(..., image=...): the dense map against crop-by-crop, on the given image."""
    r = _compare_with_crops(model, fcn, image, size, dtype=dtype, device=device)
    ok = passes(kind, tol, r["max_abs"], r["scale"]) and r["finite"]
    return VerifyReport(r["max_abs"], r["max_rel"], str(dtype).replace("torch.", ""),
                        r["input_shape"], r["output_shape"], tolerance_text(kind, tol), ok,
                        r["cells"], r["exact"], tuple(r["reasons"]))


def _compare_with_crops(model, fcn, image, size, *, dtype, device, step=None) -> dict:
    """Dense map vs crop-by-crop on ``image``, over the cells whose window fits inside.

    Used by ``nofc.verify(..., image=...)``. Returns max abs error, max relative error
    (normwise over the compared cells), the number of cells, and whether the geometry
    says the two should be equal.
    """
    fcn = as_fcn(fcn, size)
    geo = cached_geometry(fcn, size)
    steps = geo.check_step(step)
    x = as_batch(image, size[0])
    geo.check_fits(x.shape[-2:])
    dense = dense_predict(fcn, x, size, steps, device=device, dtype=dtype)
    naive = sliding_window_predict(model, x, size, steps, device=device, dtype=dtype)
    h, w = min(dense.shape[2], naive.shape[2]), min(dense.shape[3], naive.shape[3])
    a, b = naive[:, :, :h, :w], dense[:, :, :h, :w]
    diff = (a - b).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else max_abs,
        "scale": scale,
        "cells": int(h * w * x.shape[0]),
        "input_shape": tuple(x.shape),
        "output_shape": tuple(dense.shape),
        "exact": geo.exact,
        "reasons": geo.reasons,
        "finite": bool(torch.isfinite(a).all() == torch.isfinite(b).all()),
    }
