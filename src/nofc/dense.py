"""Dense prediction: one pass of the converted network over a whole image.

``dense_predict`` runs the fully convolutional network once per image and returns a map
with one cell per input window. For a step finer than the network stride it runs the
dilated network (``nofc.dilation``: still one pass, in row bands when the image is large)
or, where that is not exact, once per shift (shift-and-stitch).
``sliding_window_predict`` is the crop-by-crop baseline on the original classifier that
the map is checked against.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ._fx import param_like
from .crops import CropNet, crop_scores, map_network
from .dilation import fine_pass
from .engines import engine_precision, on_engine
from .errors import NofcError, call_model, check_input_size
from .precision import low_precision
from .streaming import streamed
from .receptive import cached_geometry
from .windows import Geometry, parse_step

__all__ = ["dense_predict", "sliding_window_predict", "BAND_BUDGET"]

BAND_BUDGET = 2 << 30  # bytes of activations a dilated pass may hold; above, row bands


def as_batch(image, channels: int) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) tensor or array -> floating (B, C, H, W) tensor."""
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "biuf":
            raise NofcError(f"image pixels must be numbers (uint8, uint16, float32, ...), "
                            f"got dtype {image.dtype}; convert them first, e.g. "
                            "np.asarray(image, dtype=np.float32)")
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


def placed(model: nn.Module, device, dtype) -> tuple[nn.Module, torch.device, torch.dtype]:
    """The model on ``device`` in ``dtype``: itself when it already is, else a copy."""
    have_device, have_dtype = param_like(model)
    device = have_device if device is None else torch.device(device)
    dtype = have_dtype if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NofcError(f"dtype must be a floating point torch dtype, got {dtype}")
    if (device, dtype) != (have_device, have_dtype) or model.training:
        # a copy also for a model in train mode: eval() must not flip the user's flag
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval(), device, dtype


def pad_edges(x: torch.Tensor, pads, edges: str) -> torch.Tensor:
    """``x`` padded by ``(top, bottom, left, right)`` with zeros or by reflection.

    >>> pad_edges(torch.arange(3.).reshape(1, 1, 1, 3), (0, 0, 1, 1), "reflect")
    tensor([[[[1., 0., 1., 2., 1.]]]])
    """
    top, bottom, left, right = pads
    if not any(pads):
        return x
    if edges == "reflect" and (max(top, bottom) >= x.shape[-2] or max(left, right) >= x.shape[-1]):
        raise NofcError(f"edges='reflect' cannot pad a {x.shape[-2]}x{x.shape[-1]} image by "
                        f"{top},{bottom} rows and {left},{right} columns (a reflection needs "
                        "more pixels than it adds); use edges='zeros'")
    mode = "reflect" if edges == "reflect" else "constant"
    return torch.nn.functional.pad(x, (left, right, top, bottom), mode=mode)


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
    method: str = "auto",
    edges: str = "inside",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    precision: str = "fp32",
    engine: str = "torch",
    progress: bool = False,
    check: bool = True,
) -> torch.Tensor:
    """Class scores for every window of the image, in one pass of the network.

    Args:
        fcn: the result of ``nofc.convert(model, input_size)`` (a classifier that was not
            converted yet is converted first).
        image: ``(C, H, W)`` or ``(B, C, H, W)`` tensor or numpy array, already normalised.
        input_size: ``(C, H, W)`` the classifier was trained on (the window).
        step: distance between neighbouring windows; ``None`` is the network stride
            (``nofc.geometry(fcn, input_size).stride``). A step that divides the stride
            needs ``method``.
        method: how a step finer than the stride is computed. ``"dilate"``: one pass of
            the dilated network (``nofc.dilate``), built once per step and kept on
            ``fcn``; images whose activations would exceed ``nofc.dense.BAND_BUDGET``
            bytes go through it in row bands, with the same result. ``"shift"``:
            ``(stride/step)**2`` passes on shifted images, interleaved
            (shift-and-stitch). ``"auto"`` (default): dilated where that equals
            shift-and-stitch (no padding; ``ceil_mode`` is fine), else shift-and-stitch, saying
            why in a one-line warning, once per network and step. A network that cannot
            be dilated runs shift-and-stitch with such a warning. ``"crops"``: the
            classifier itself on every window at ``step`` (default: the window), in
            batches (``nofc.crops``): exact for any classifier, one forward per window;
            ``"auto"`` does this too for a classifier that ``convert`` refuses (a ViT's
            class token), with a one-line warning.
        edges: ``"inside"`` (default): one cell per window wholly inside the image,
            ``(H - window_h) // step + 1`` rows, as crop by crop. ``"zeros"`` or
            ``"reflect"``: the image is first padded on all four sides (evenly, the odd
            pixel at the bottom and right) so that windows cover every pixel,
            ``ceil((H - window_h) / step) + 1`` rows; ``geo.with_edges(hw, edges)`` gives
            that map's windows (the first starts at ``-top``).
        batch_size: images per forward pass (default: all).
        device, dtype: where and in which precision to run (default: the network's). The
            network is copied when they differ, never modified.
        precision: ``"fp32"`` (default: every operation in ``dtype``), ``"bf16"`` or
            ``"fp16"`` (the matrix products in bfloat16 or float16 on the matrix units,
            accumulated in float32; float32 scores) or ``"auto"`` (bf16 where the hardware
            has bfloat16 matrix units, else fp32). The rule, and how it runs on a CPU and
            on CUDA: ``nofc.precision``.
        engine: ``"torch"`` (default), ``"onnxruntime"`` or ``"openvino"``: the float32
            pass run in that engine on the CPU, the same map to float32 tolerance
            (``nofc.engines``: what it runs, and what it refuses).
        progress: show a progress bar (tqdm, on stderr) over batches and shifted passes.
        check: when ``fcn`` is a classifier nofc converts here, check that the conversion
            gives the classifier's outputs at ``input_size`` first (one forward each;
            a NofcError naming the error if not). ``False`` skips it.

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
    >>> nofc.dense_predict(fcn, torch.randn(1, 64, 48), (1, 32, 32), 1, method="shift").shape
    torch.Size([1, 10, 33, 17])
    >>> nofc.dense_predict(fcn, torch.randn(1, 66, 49), (1, 32, 32), edges="zeros").shape
    torch.Size([1, 10, 10, 6])
    """
    size = check_input_size(input_size)
    net = map_network(fcn, size, method=method, step=step, check=check)
    geo = cached_geometry(net, size)
    steps = geo.check_step(step)
    x = as_batch(image, size[0])
    edged = geo.with_edges(x.shape[-2:], edges, step=steps)
    edged.check_fits(x.shape[-2:])
    x = pad_edges(x, edged.padding(x.shape[-2:], step=steps), edges)
    fine = None if isinstance(net, CropNet) else fine_pass(net, size, steps, method)
    if fine is not None:
        net = fine.net
    low = low_precision(engine_precision(engine, precision),
                        torch.device(device or param_like(net)[0]), dtype)
    net, device, dtype = placed(net, device, dtype)
    net = on_engine(net, size, engine, fine=fine is not None, low=low, device=device,
                    dtype=dtype)
    if engine != "torch":
        low = None  # the engine runs its own precision, float32 in and out
    if low is not None:
        net = low.network(net)
        if fine is None:  # the same windows; its own node names, where streaming cuts
            geo = cached_geometry(net, size)
    factors = (1, 1) if fine is not None else geo.factors(steps)
    chunks = list(_chunks(x.shape[0], batch_size))
    outs = []
    passes = len(chunks) * factors[0] * factors[1]
    with (torch.no_grad(), low.context() if low else contextlib.nullcontext(),
          tqdm(total=passes, file=sys.stderr, disable=not progress or passes < 2, desc="nofc",
               unit="pass") as bar):
        for sl in chunks:
            xb = x[sl].to(device=device, dtype=dtype) if low is None else low.input(x[sl])
            if fine is not None:
                outs.append(_dilated(net, fine.bytes_per_pixel, xb, size,
                                     geo.output_shape(xb.shape[-2:], step=steps)))
                bar.update()
            elif factors == (1, 1):
                h, w = geo.output_shape(xb.shape[-2:])  # the network may give more
                outs.append(_forward(net, geo, xb)[..., :h, :w])
                bar.update()
            else:
                outs.append(_shift_and_stitch(net, xb, geo, steps, factors, bar.update))
    out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
    if low is not None:
        out = out.float().contiguous()
    return _mark_nonfinite(out, x, geo, steps)


def _forward(net: nn.Module, geo: Geometry, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` (streamed); an error raised inside the network is one NofcError line
    naming the network, the input it failed on and the first line of the error (the
    traceback stays on it as ``__cause__``: ``nofc --debug`` prints it)."""
    return call_model(net, x, run=lambda: streamed(net, geo, x))


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


def _dilated(net, bytes_per_pixel: float, x: torch.Tensor, size, hw) -> torch.Tensor:
    """One pass of the dilated network, cropped to the ``hw`` cells shift-and-stitch has;
    in row bands (exact, like tiles) when its activations would exceed ``BAND_BUDGET``."""
    h, w = hw
    geo = cached_geometry(net, size)  # stride == step
    row_bytes = bytes_per_pixel * x.element_size() / 4 * x.shape[0] * x.shape[-1]
    rows = int(BAND_BUDGET // max(row_bytes, 1) - geo.receptive_field[0]) // geo.stride[0]
    if rows >= h:
        return _forward(net, geo, x)[..., :h, :w]
    out = None
    for a in range(0, h, max(1, rows)):
        b = min(h, a + max(1, rows))
        p0, p1, skip = geo.span(0, a, b, x.shape[-2])
        part = _forward(net, geo, x[..., p0:p1, :])[..., skip:skip + b - a, :w]  # (B, K, b-a, w)
        if out is None:
            out = part.new_empty((*part.shape[:2], h, w))
        out[:, :, a:b] = part
    return out


def _shift_and_stitch(net, x, geo: Geometry, steps, factors, tick=None) -> torch.Tensor:
    """Run the network on the image shifted by every multiple of ``step`` below the stride
    and interleave the maps: pass (a, b) gives the cells (i*fy + a, j*fx + b)."""
    fy, fx_ = factors
    H, W = x.shape[-2:]
    n0 = geo.network_shape((H, W))
    out = None
    for a in range(fy):
        for b in range(fx_):
            dy, dx = a * steps[0], b * steps[1]
            if min(geo.network_shape((H - dy, W - dx))) < 1:
                continue
            part = _forward(net, geo, x[..., dy:, dx:])  # (B, K, n_a, n_b)
            if tick is not None:
                tick()
            if out is None:
                out = part.new_zeros((*part.shape[:2], n0[0], fy, n0[1], fx_))
            out[:, :, : part.shape[2], a, : part.shape[3], b] = part
    ny, nx = geo.output_shape((H, W), step=steps)  # windows inside: every pass has them
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
    size = check_input_size(input_size)
    if not isinstance(model, nn.Module):
        raise NofcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    steps = parse_step(step)
    x = as_batch(image, size[0])
    wh, ww = size[1:]
    H, W = x.shape[-2:]
    if H < wh or W < ww:
        raise NofcError(f"image is {H}x{W}, smaller than the {wh}x{ww} window; pad or resize "
                        f"it to at least {wh}x{ww}")
    model, device, dtype = placed(model, device, dtype)
    with torch.no_grad():
        return crop_scores(model, x, size[1:], steps, batch=batch_size, device=device,
                           dtype=dtype)
