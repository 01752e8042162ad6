"""Dense maps of images of any size: exact halo tiling, zarr output, Dask.

The map is cut into blocks of output cells. Each block is computed from an input tile that
starts on a multiple of the network stride (so every layer's grid lines up with the whole
image's) and carries a halo of the receptive-field margin (so no kept cell ever sees the
tile's own border padding). The stitched map therefore equals ``dense_predict`` on the
whole image; memory is bounded by the tile, not the image. Finished blocks go to a sink
(``nofc.sinks``: memory or a zarr store); tiling does not care which.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ._fx import param_like, probe
from .conversion import as_fcn
from .dense import dense_predict
from .errors import NofcError, check_input_size
from .images import (
    TiffSource,
    default_scale,
    image_layout,
    open_image_array,
    read_region,
    spatial_shape,
    to_tensor,
)
from .sinks import open_sink
from .windows import cached_geometry

__all__ = ["tiled_predict", "plan_tiles"]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Tile:
    """One block of output cells and the input region it is computed from."""

    index: tuple[int, int]  # block index (by, bx)
    out: tuple[int, int, int, int]  # map cells (a, b, c, d): rows a..b-1, columns c..d-1
    inp: tuple[int, int, int, int]  # input pixels (y0, y1, x0, x1)
    skip: tuple[int, int]  # tile map rows/cols to drop at the start


def plan_tiles(geo, image_hw: tuple[int, int], *, tile: int, step=None) -> tuple[list[Tile],
                                                                                 tuple[int, int]]:
    """Cut the map of an ``image_hw`` image into blocks of about ``tile`` input pixels.

    Returns the tiles and the map shape. Each tile's input starts on a multiple of the
    stride and reaches as far as the receptive field of its last cell (clipped to the
    image, where the network's own padding takes over exactly as on the whole image).

    >>> import nofc
    >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
    >>> tiles, shape = plan_tiles(geo, (100, 80), tile=32)
    >>> len(tiles), shape, tiles[1].out, tiles[1].inp
    (6, (18, 13), (0, 8, 8, 13), (0, 60, 32, 80))
    """
    H, W = image_hw
    steps, fine = geo.check_step(step), geo.factors(step)
    geo.check_fits((H, W))
    h, w = geo.output_shape((H, W), step=step)
    per = [max(1, tile // geo.stride[a]) * fine[a] for a in (0, 1)]  # map cells per block
    y_spans = [_span(geo, 0, steps, fine, a, min(h, a + per[0]), H) for a in range(0, h, per[0])]
    x_spans = [_span(geo, 1, steps, fine, c, min(w, c + per[1]), W) for c in range(0, w, per[1])]
    tiles = [Tile((by, bx), (a, b, c, d), (y0, y1, x0, x1), (sy, sx))
             for by, (a, b, y0, y1, sy) in enumerate(y_spans)
             for bx, (c, d, x0, x1, sx) in enumerate(x_spans)]
    return tiles, (h, w)


def _span(geo, axis: int, steps, factors, a: int, b: int, n: int):
    """Map cells a..b-1 along ``axis`` (fine grid), their input span [p0, p1) in an image
    ``n`` pixels long, and how many cells of the tile's map to skip."""
    stride, step, fine = geo.stride[axis], steps[axis], factors[axis]
    rf, rf_off = geo.receptive_field[axis], geo.rf_offset[axis]
    # coarse cell i with shift k (fine index i * fine + k) starts at i*stride + k*step
    first = a * step + rf_off  # field start of fine cell a
    last = (b - 1) * step + rf_off + rf  # field end of fine cell b-1
    if fine > 1:
        # shift-and-stitch crops up to stride - step pixels off the tile's top: keep that
        # much more halo, and a stride more at the end so every shifted pass has the cells
        first -= stride - step
        last += stride
    p0 = max(0, (first // stride) * stride)
    p1 = min(n, last)
    skip = (p0 // stride) * fine
    return a, b, p0, p1, a - skip


# --------------------------------------------------------------------------- compute


_UNPICKLED = 0  # how many times a tile runner arrived in this process (tests: once/worker)


class _TileRunner:
    """Everything a worker needs to compute one tile; pickled once per worker."""

    def __setstate__(self, state):
        global _UNPICKLED
        _UNPICKLED += 1
        self.__dict__.update(state)

    def __init__(self, fcn, input_size, step, scale, mean, std, dtype, device, layout):
        self.fcn = fcn
        self.input_size = input_size
        self.step = step
        self.scale, self.mean, self.std = scale, mean, std
        self.dtype = dtype
        self.device = device
        self.layout = layout

    def read(self, src, t: Tile) -> np.ndarray:
        y0, y1, x0, x1 = t.inp
        return read_region(src, self.layout, slice(y0, y1), slice(x0, x1))

    def __call__(self, src, t: Tile) -> np.ndarray:
        return self.compute(self.read(src, t), t)

    def compute(self, region: np.ndarray, t: Tile) -> np.ndarray:
        x = to_tensor(region, self.scale, self.mean, self.std, self.dtype, self.device)
        with torch.no_grad(), warnings.catch_warnings():
            # NaN/Inf pixels: dense_predict marks their cells NaN and would warn once per
            # tile in tile coordinates; tiled_predict warns once for the whole map instead
            warnings.simplefilter("ignore")
            scores = dense_predict(self.fcn, x[None], input_size=self.input_size, step=self.step,
                                   device=self.device)[0]
        a, b, c, d = t.out
        sy, sx = t.skip
        block = scores[:, sy:sy + (b - a), sx:sx + (d - c)]
        if block.shape[1:] != (b - a, d - c):  # pragma: no cover - a planning bug
            raise NofcError(f"internal: tile {t.index} gave {tuple(block.shape)} for cells "
                            f"{t.out}")
        return block.cpu().numpy()


def tiled_predict(
    fcn: nn.Module,
    image,
    input_size,
    tile: int = 2048,
    out: str | os.PathLike | None = None,
    backend: str = "local",
    *,
    step=None,
    layout: str = "auto",
    mean=None,
    std=None,
    scale: float | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    metadata: dict | None = None,
):
    """Dense map of an image of any size, tile by tile; equals ``dense_predict`` exactly.

    Args:
        fcn: the converted network (``nofc.convert``); a classifier that is not converted
            yet is converted first.
        image: numpy array or memmap, zarr array, dask array, tensor, or a file path (TIFF
            is read lazily region by region; PNG/JPEG are read whole). ``(H, W)``,
            ``(H, W, C)`` or ``(C, H, W)``: see ``layout``.
        input_size: ``(C, H, W)`` the classifier was trained on.
        tile: input pixels per tile side (before the halo); memory grows with it.
        out: a zarr store path: chunks are written as they finish, a killed run started
            again with the same arguments resumes, and a store made with other arguments
            is refused. ``None`` returns a numpy array.
        backend: ``"local"`` (this process) or ``"dask"`` (a dask graph over the tiles,
            on the local scheduler, or the cluster at ``scheduler="tcp://host:8786"``, or a
            ``distributed.LocalCluster`` of ``workers`` processes).
        step: map step in pixels (a divisor of the stride: shift-and-stitch), default stride.
        layout: ``"auto"``, ``"hwc"`` or ``"chw"``.
        mean, std, scale: normalisation applied per tile: ``(x * scale - mean) / std``;
            ``scale`` defaults to ``1 / max`` for integer images (255 for uint8) and 1 else.
        metadata: kept with the map in the zarr store's attributes (class names, say).

    Returns:
        ``(K, h, w)`` numpy array (float32, or float64 with ``dtype=torch.float64``), or
        the zarr array when ``out`` is given.

    >>> import numpy as np, nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> img = np.random.rand(300, 200).astype(np.float32)
    >>> nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=64, progress=False).shape
    (10, 68, 43)
    """
    size = check_input_size(input_size)
    if backend not in ("local", "dask"):
        raise NofcError(f"backend must be 'local' or 'dask', got {backend!r}")
    if not isinstance(tile, int) or tile < 1:
        raise NofcError(f"tile must be a positive number of pixels, got {tile!r}")
    fcn = as_fcn(fcn, size)  # a classifier that is not converted yet is converted here
    geo = cached_geometry(fcn, size)
    _check_tileable(fcn, geo, tile)
    src = open_image_array(image)
    lay = image_layout(tuple(src.shape), size[0], layout)
    hw = spatial_shape(tuple(src.shape), lay)
    tiles, (h, w) = plan_tiles(geo, hw, tile=tile, step=step)
    if scale is None:
        scale = default_scale(np.dtype(getattr(src, "dtype", np.float32)))
    device = torch.device(param_like(fcn)[0] if device is None else device)
    runner = _TileRunner(fcn.eval(), size, step, float(scale), mean, std, dtype, device, lay)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    block = (max(t.out[1] - t.out[0] for t in tiles), max(t.out[3] - t.out[2] for t in tiles))
    sink = open_sink(out, (_num_outputs(fcn, size), h, w), np_dtype, chunks=block, geo=geo,
                     metadata=metadata, arguments=lambda: _arguments(
                         fcn, size, hw, tile, step, scale, mean, std, dtype))
    todo = [t for t in tiles if t.index not in sink.done]
    with _progress(len(tiles), len(tiles) - len(todo), progress) as bar:
        if backend == "local":
            _run_local(runner, src, todo, sink, bar)
        else:
            _run_dask(runner, src, todo, sink, bar, scheduler=scheduler, workers=workers)
    if sink.nan_cells:
        warnings.warn(f"the image has NaN or Inf pixels: {sink.nan_cells} map cells see them "
                      "and are NaN", stacklevel=2)
    return sink.finalize()


def _check_tileable(fcn, geo, tile: int) -> None:
    """Refuse networks no tile can reproduce, and tiles smaller than the stride."""
    context = list(getattr(getattr(fcn, "_nofc_record", None), "global_context", []) or [])
    if context or any("global context" in r for r in geo.reasons):
        raise NofcError(
            "the network pools over the whole image inside its body (squeeze-and-excitation: "
            f"{', '.join(context[:3])}...), so a tile cannot reproduce the whole-image map; "
            "run dense_predict on the whole image instead")
    if tile < geo.stride[0] or tile < geo.stride[1]:
        raise NofcError(f"tile={tile} is smaller than the network stride {geo.stride}; use a "
                        f"tile of at least {max(geo.stride)} pixels (a few times the window "
                        f"{geo.window} is efficient)")


def _arguments(fcn, size, hw, tile, step, scale, mean, std, dtype) -> dict:
    """Everything the map depends on: a store written for other arguments is refused."""
    return {
        "model": type(fcn).__name__,
        "model_hash": _model_hash(fcn),
        "input_size": list(size),
        "image_shape": list(hw),
        "tile": tile,
        "step": step,
        "scale": scale, "mean": _jsonable(mean), "std": _jsonable(std),
        "dtype": str(dtype),
    }


def _model_hash(fcn: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in list(fcn.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1)[:4096].numpy().tobytes())
        h.update(str(float(t.double().sum())).encode() if t.is_floating_point() else b"")
    return h.hexdigest()[:16]


def _jsonable(v):
    if v is None:
        return None
    return [float(t) for t in np.atleast_1d(np.asarray(v, dtype=np.float64))]


def _num_outputs(fcn, size) -> int:
    """The number of classes, from a shape probe at the reference size."""
    rec = probe(fcn, (1, *size))
    shape = rec.shapes.get("output")
    if shape is None or len(shape) != 4:
        raise NofcError(f"the network's output is {shape}, not a (B, K, h, w) map")
    return int(shape[1])


def _progress(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tile", desc="nofc tiles",
                disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------- run


def _run_local(runner, src, todo, sink, bar) -> None:
    for t in todo:
        sink.aggregate(t, runner(src, t))
        bar.update(1)


def _run_dask(runner, src, todo, sink, bar, *, scheduler, workers) -> None:
    try:
        import dask  # noqa: F401
    except ImportError:  # pragma: no cover
        raise NofcError("backend='dask' needs the scale extra: pip install 'nofc[scale]'") from None
    with _dask_client(scheduler, workers) as client:
        if client is None:
            _run_threads(runner, src, todo, sink, bar)
        else:
            _run_cluster(client, runner, src, todo, sink, bar)


@contextlib.contextmanager
def _dask_client(scheduler, workers):
    """A client of the cluster at ``scheduler``, or of a new local cluster of ``workers``
    processes; None when neither is given (Dask's threaded scheduler)."""
    if scheduler is None and workers is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover
        raise NofcError("a Dask scheduler needs 'distributed': pip install 'nofc[scale]'"
                        ) from None
    cluster = None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="10s")
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    else:
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_threads(runner, src, todo, sink, bar) -> None:
    """Dask's threaded scheduler, in waves so results are written (and resumable) as they
    finish; the runner (the model) and the source are one graph node each."""
    import dask
    from dask import delayed

    runner_d = delayed(runner, pure=True, name="nofc-model")
    src_d = delayed(src, pure=True, name="nofc-image")
    tasks = [delayed(_call)(runner_d, src_d, t) for t in todo]
    wave = max(1, (os.cpu_count() or 1) * 2)
    for i in range(0, len(tasks), wave):
        blocks = dask.compute(*tasks[i:i + wave], scheduler="threads")
        for t, block in zip(todo[i:i + wave], blocks):
            sink.aggregate(t, block)
            bar.update(1)


def _run_cluster(client, runner, src, todo, sink, bar) -> None:
    """A distributed cluster: the model travels inside a worker plugin, unpickled exactly
    once per worker (workers that join later get it too), then used by every tile there;
    at most two tiles per worker are in flight, so memory stays bounded by the tile."""
    from distributed import as_completed

    plugin = f"nofc-model-{uuid.uuid4().hex[:12]}"
    client.register_plugin(_ModelPlugin(runner), name=plugin)
    try:
        limit = 2 * max(1, len(client.scheduler_info().get("workers", {})))
        remote = isinstance(src, TiffSource) or type(src).__module__.startswith("zarr")
        if remote:  # workers read their own regions (the file must be reachable from them)
            [src_f] = client.scatter([src], broadcast=True)

        def submit(t):
            if remote:
                return client.submit(_call, plugin, src_f, t, pure=False)
            # in-memory or dask arrays: read here and send each tile only its region,
            # scattered rather than inlined so large arrays stay out of the graph
            region = client.scatter(runner.read(src, t), hash=False)
            return client.submit(_compute, plugin, region, t, pure=False)

        queue = iter(todo)
        futures = {submit(t): t for t in itertools.islice(queue, limit)}
        pending = as_completed(list(futures))
        for fut in pending:
            t = futures.pop(fut)
            sink.aggregate(t, fut.result())
            bar.update(1)
            nxt = next(queue, None)
            if nxt is not None:
                f = submit(nxt)
                futures[f] = nxt
                pending.add(f)
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin)


def _worker_runner(runner):
    """The runner itself, or the one a worker plugin of that name holds."""
    if isinstance(runner, str):
        from distributed import get_worker

        return get_worker().plugins[runner].runner
    return runner


def _call(runner, src, t):
    return _worker_runner(runner)(src, t)


def _compute(runner, region, t):
    return _worker_runner(runner).compute(region, t)


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - dask is the optional scale extra
    _WorkerPlugin = object


class _ModelPlugin(_WorkerPlugin):
    """Holds the tile runner (and so the model) on each Dask worker."""

    def __init__(self, runner):
        self.runner = runner
