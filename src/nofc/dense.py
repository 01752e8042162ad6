"""Dense prediction: one pass of the converted network over a whole image.

``dense_predict`` runs the fully convolutional network once per image (or, for a step
finer than the network stride, once per shift: shift-and-stitch) and returns a map with
one cell per input window; ``sliding_window_predict`` is the crop-by-crop baseline on the
original classifier that the map is checked against.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from tqdm import tqdm

from .convert import _check_input_size, _param_like, convert
from .errors import NofcError
from .geometry import Geometry, geometry

__all__ = ["dense_predict", "sliding_window_predict"]


def _as_batch(image, channels: int) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) tensor or array -> floating (B, C, H, W) tensor."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise NofcError(f"image must be a torch.Tensor or numpy array of shape (C, H, W) or "
                        f"(B, C, H, W), got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise NofcError(f"image must be (C, H, W) or (B, C, H, W), got shape "
                        f"{tuple(image.shape)}")
    if image.shape[1] != channels:
        raise NofcError(f"image has {image.shape[1]} channels, the network expects {channels} "
                        f"(image shape {tuple(image.shape)}; channels come first)")
    if not image.is_floating_point():
        image = image.float()
    return image


def _placed(model: nn.Module, device, dtype) -> tuple[nn.Module, torch.device, torch.dtype]:
    """The model on ``device`` in ``dtype``: itself when it already is, else a copy."""
    have_device, have_dtype = _param_like(model)
    device = have_device if device is None else torch.device(device)
    dtype = have_dtype if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NofcError(f"dtype must be a floating point torch dtype, got {dtype}")
    if (device, dtype) != (have_device, have_dtype) or model.training:
        # a copy also for a model in train mode: eval() must not flip the user's flag
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval(), device, dtype


def _as_fcn(model: nn.Module, size) -> fx.GraphModule:
    """``model`` itself when nofc converted it for ``size``; else its conversion."""
    if not isinstance(model, nn.Module):
        raise NofcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    have = getattr(model, "_nofc_input_size", None)
    if have is not None:
        if tuple(have) != tuple(size):
            raise NofcError(f"the network was converted for input_size={tuple(have)}, not "
                            f"{tuple(size)}")
        return model
    return convert(model, size)


def _geometry(fcn: nn.Module, size) -> Geometry:
    """geometry() remembered on the module, so repeated calls do not re-probe."""
    cache = fcn.__dict__.setdefault("_nofc_geometry_cache", {})
    if size not in cache:
        cache[size] = geometry(fcn, size)
    return cache[size]


def _parse_step(step) -> tuple[int, int]:
    try:
        steps = (int(step), int(step)) if np.ndim(step) == 0 else tuple(int(s) for s in step)
    except (TypeError, ValueError):
        steps = ()
    if len(steps) != 2 or min(steps) < 1:
        raise NofcError(f"step must be a positive integer or (sy, sx), got {step!r}")
    return steps  # type: ignore[return-value]


def _check_step(step, geo: Geometry) -> tuple[int, int]:
    if step is None:
        return geo.stride
    steps = _parse_step(step)
    for s, stride, axis in zip(steps, geo.stride, "yx"):
        if stride % s:
            good = [d for d in range(1, stride + 1) if stride % d == 0]
            raise NofcError(
                f"step {s} ({axis}) does not divide the network stride {stride}: steps that "
                f"work are {', '.join(map(str, good))} (shift-and-stitch for the smaller ones)")
    return steps  # type: ignore[return-value]


def _check_fits(hw, geo: Geometry, what: str = "image") -> None:
    need = geo.min_size()
    if hw[0] < need[0] or hw[1] < need[1]:
        raise NofcError(f"{what} is {hw[0]}x{hw[1]}, smaller than the {need[0]}x{need[1]} "
                        f"window; pad or resize it to at least {need[0]}x{need[1]}")


def _chunks(n: int, size: int | None) -> Iterator[slice]:
    size = n if size is None else size
    if not isinstance(size, int) or size < 1:
        raise NofcError(f"batch_size must be a positive integer, got {size!r}")
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def dense_predict(
    fcn: nn.Module,
    image,
    input_size,
    step=None,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Class scores for every window of the image, in one pass of the network.

    Args:
        fcn: the result of ``nofc.convert(model, input_size)`` (a classifier that was not
            converted yet is converted first).
        image: ``(C, H, W)`` or ``(B, C, H, W)`` tensor or numpy array, already normalised.
        input_size: ``(C, H, W)`` the classifier was trained on (the window).
        step: distance between neighbouring windows; ``None`` is the network stride
            (``nofc.geometry(fcn, input_size).stride``). A step that divides the stride
            runs ``(stride/step)**2`` shifted passes and interleaves them
            (shift-and-stitch).
        batch_size: images per forward pass (default: all).
        device, dtype: where and in which precision to run (default: the network's). The
            network is copied when they differ, never modified.
        progress: show a progress bar (tqdm, on stderr) over batches and shifted passes.

    Returns:
        ``(B, K, h, w)`` scores on ``device``; cell ``(i, j)`` belongs to the window at
        ``(oy + i*step_y, ox + j*step_x)`` of ``geo.window`` (exactly the classifier on
        that crop when ``geo.exact``).

    >>> import torch, nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> nofc.dense_predict(fcn, torch.randn(1, 64, 48), input_size=(1, 32, 32)).shape
    torch.Size([1, 10, 9, 5])
    >>> nofc.dense_predict(fcn, torch.randn(2, 1, 64, 48), (1, 32, 32), step=2).shape
    torch.Size([2, 10, 17, 9])
    """
    size = _check_input_size(input_size)
    net = _as_fcn(fcn, size)
    geo = _geometry(net, size)
    steps = _check_step(step, geo)
    x = _as_batch(image, size[0])
    hw = tuple(x.shape[-2:])
    _check_fits(hw, geo)
    net, device, dtype = _placed(net, device, dtype)
    factors = (geo.stride[0] // steps[0], geo.stride[1] // steps[1])
    chunks = list(_chunks(x.shape[0], batch_size))
    outs = []
    passes = len(chunks) * factors[0] * factors[1]
    with torch.no_grad(), tqdm(total=passes, file=sys.stderr, disable=not progress or passes < 2,
                               desc="nofc", unit="pass") as bar:
        for sl in chunks:
            xb = x[sl].to(device=device, dtype=dtype)  # (b, C, H, W)
            if factors == (1, 1):
                outs.append(net(xb))
                bar.update()
            else:
                outs.append(_shift_and_stitch(net, xb, geo, steps, factors, bar.update))
    out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
    return _mark_nonfinite(out, x, geo, steps)


def _mark_nonfinite(out: torch.Tensor, x: torch.Tensor, geo: Geometry, steps) -> torch.Tensor:
    """Warn about NaN/Inf pixels and set every cell whose window or receptive field holds
    one to NaN: a saturating activation (tanh) would otherwise turn Inf into a finite,
    wrong score."""
    if bool(torch.isfinite(x.sum())):  # fast path: a NaN or Inf pixel makes the sum one
        return out
    bad = ~torch.isfinite(x).all(1, keepdim=True)  # (B, 1, H, W)
    if not bool(bad.any()):
        return out
    lo = [min(geo.offset[a], geo.rf_offset[a]) for a in (0, 1)]
    hi = [max(geo.offset[a] + geo.window[a], geo.rf_offset[a] + geo.receptive_field[a])
          for a in (0, 1)]
    (H, W), (h, w) = x.shape[-2:], out.shape[-2:]
    top, left = max(0, -lo[0]), max(0, -lo[1])
    bottom = max(0, hi[0] + (h - 1) * steps[0] - H)
    right = max(0, hi[1] + (w - 1) * steps[1] - W)
    m = torch.nn.functional.pad(bad.float(), (left, right, top, bottom))
    m = m[..., lo[0] + top:, lo[1] + left:]  # cell (i, j) spans [i*step, i*step + hi - lo)
    cells = torch.nn.functional.max_pool2d(m, (hi[0] - lo[0], hi[1] - lo[1]),
                                           stride=tuple(steps))[..., :h, :w] > 0
    _, _, y0, x0 = (int(v) for v in bad.nonzero()[0])
    warnings.warn(f"the image has {int(bad.sum())} pixels with NaN or Inf (the first at row "
                  f"{y0}, column {x0}); the {int(cells.sum())} map cells that see them are "
                  "set to NaN", stacklevel=3)
    return out.masked_fill(cells.to(out.device), float("nan"))


def _shift_and_stitch(net, x, geo: Geometry, steps, factors, tick=None) -> torch.Tensor:
    """Run the network on the image shifted by every multiple of ``step`` below the stride
    and interleave the maps: pass (a, b) gives the cells (i*fy + a, j*fx + b)."""
    fy, fx_ = factors
    H, W = x.shape[-2:]
    n0 = geo.output_shape((H, W))
    out = None
    counts_y, counts_x = [], []
    for a in range(fy):
        for b in range(fx_):
            dy, dx = a * steps[0], b * steps[1]
            n = geo.output_shape((H - dy, W - dx))
            if b == 0:
                counts_y.append(n[0])
            if a == 0:
                counts_x.append(n[1])
            if min(n) < 1:
                continue
            part = net(x[..., dy:, dx:])  # (B, K, n_a, n_b)
            if tick is not None:
                tick()
            if out is None:
                out = part.new_zeros((*part.shape[:2], n0[0], fy, n0[1], fx_))
            out[:, :, : part.shape[2], a, : part.shape[3], b] = part
    # the filled cells form a prefix: pass a fills rows a, a + fy, ... up to its count
    ny = min(c * fy + a for a, c in enumerate(counts_y))
    nx = min(c * fx_ + b for b, c in enumerate(counts_x))
    B, K = out.shape[:2]
    return out.reshape(B, K, n0[0] * fy, n0[1] * fx_)[:, :, :ny, :nx]


def sliding_window_predict(
    model: nn.Module,
    image,
    input_size,
    step=32,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The baseline: the original classifier run crop by crop, ``batch_size`` crops at a time.

    Windows of ``input_size`` start at ``(i*step_y, j*step_x)`` and must fit inside the
    image. Crops are views (``Tensor.unfold``) gathered one batch at a time.

    Returns:
        ``(B, K, h, w)`` with ``h = (H - window_h) // step_y + 1`` (same for ``w``).

    >>> import torch, nofc
    >>> m = nofc.zoo.LeNet5()
    >>> nofc.sliding_window_predict(m, torch.randn(1, 64, 48), (1, 32, 32), step=4).shape
    torch.Size([1, 10, 9, 5])
    """
    size = _check_input_size(input_size)
    if not isinstance(model, nn.Module):
        raise NofcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    steps = _parse_step(step)
    x = _as_batch(image, size[0])
    wh, ww = size[1:]
    H, W = x.shape[-2:]
    if H < wh or W < ww:
        raise NofcError(f"image is {H}x{W}, smaller than the {wh}x{ww} window; pad or resize "
                        f"it to at least {wh}x{ww}")
    model, device, dtype = _placed(model, device, dtype)
    ny, nx = (H - wh) // steps[0] + 1, (W - ww) // steps[1] + 1
    windows = x.unfold(2, wh, steps[0]).unfold(3, ww, steps[1])  # (B, C, ny, nx, wh, ww)
    total = x.shape[0] * ny * nx
    out = None
    with torch.no_grad():
        for sl in _chunks(total, batch_size):
            idx = torch.arange(sl.start, sl.stop)
            b, i, j = idx // (ny * nx), (idx // nx) % ny, idx % nx
            crops = windows[b, :, i, j].to(device=device, dtype=dtype)  # (n, C, wh, ww)
            scores = model(crops)
            scores = scores.reshape(scores.shape[0], -1)  # (n, K); a converted net gives 1x1
            if out is None:
                out = scores.new_empty((total, scores.shape[1]))
            out[sl] = scores
    return out.reshape(x.shape[0], ny, nx, -1).permute(0, 3, 1, 2)


def _compare_with_crops(model, fcn, image, size, *, dtype, device, step=None) -> dict:
    """Dense map vs crop-by-crop on ``image``, over the cells whose window fits inside.

    Used by ``nofc.verify(..., image=...)``. Returns max abs error, max relative error
    (normwise over the compared cells), the number of cells, and whether the geometry
    says the two should be equal.
    """
    fcn = _as_fcn(fcn, size)
    geo = _geometry(fcn, size)
    steps = _check_step(step, geo)
    x = _as_batch(image, size[0])
    _check_fits(tuple(x.shape[-2:]), geo)
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
        "cells": int(h * w * x.shape[0]),
        "input_shape": tuple(x.shape),
        "output_shape": tuple(dense.shape),
        "exact": geo.exact,
        "reasons": geo.reasons,
        "finite": bool(torch.isfinite(a).all() == torch.isfinite(b).all()),
    }
