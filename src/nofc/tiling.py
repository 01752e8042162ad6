"""Dense maps of images of any size: exact halo tiling, zarr output, Dask.

The map is cut into blocks of output cells. Each block is computed from an input tile that
starts on a multiple of the network stride (so every layer's grid lines up with the whole
image's) and carries a halo of the receptive-field margin (so no kept cell ever sees the
tile's own border padding). The stitched map therefore equals ``dense_predict`` on the
whole image; memory is bounded by the tile, not the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .conversion import as_fcn
from .errors import NofcError, check_input_size, first_line
from .windows import cached_geometry

__all__ = ["tiled_predict", "open_image_array", "plan_tiles"]

_DONE_DIR = ".nofc_done"  # one empty file per finished chunk, written after the chunk


# --------------------------------------------------------------------------- image sources


class _TiffSource:
    """A TIFF page read lazily, region by region, through tifffile's zarr view."""

    def __init__(self, path: str):
        try:
            import tifffile
            import zarr
        except ImportError:  # pragma: no cover - part of nofc[scale]
            raise NofcError("reading TIFF needs the scale extra: pip install 'nofc[scale]'") from None
        self.path = str(path)
        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tif.series[0]
                self.shape = tuple(page.shape)
                self.dtype = np.dtype(page.dtype)
                self.axes = page.axes
        except Exception as exc:  # noqa: BLE001
            first = first_line(exc)
            raise NofcError(f"cannot read TIFF {path}: {first}") from None
        self._zarr = zarr
        self._arr = None

    def _open(self):
        if self._arr is None:
            import tifffile

            store = tifffile.imread(self.path, aszarr=True)
            arr = self._zarr.open(store, mode="r")
            if hasattr(arr, "keys") and not hasattr(arr, "shape"):  # a multiscale group
                arr = arr[sorted(arr.keys())[0]]
            self._arr = arr
        return self._arr

    def __getitem__(self, key):
        return np.asarray(self._open()[key])

    def __getstate__(self):  # ship the path, not an open file, to Dask workers
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype, "axes": self.axes}

    def __setstate__(self, state):
        import zarr

        self.__dict__.update(state)
        self._zarr = zarr
        self._arr = None


def open_image_array(image):
    """Wrap what the user gives as something sliceable ``[y0:y1, x0:x1]`` with ``.shape``.

    Accepts a numpy array or memmap, a zarr array, a dask array, a torch tensor, or a path
    to a TIFF (read lazily, tiled and BigTIFF included). PNG and JPEG paths are read whole
    into memory (those formats cannot be read by region).
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise NofcError(f"image file not found: {image}")
        if path.stat().st_size == 0:
            raise NofcError(f"image file is empty: {image}")
        if path.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
            return _TiffSource(str(path))
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = None  # a large scan is the point here
        try:
            with Image.open(path) as im:
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                return np.asarray(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise NofcError(f"cannot read image {image}: {exc}") from None
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().numpy()
    if hasattr(image, "shape") and hasattr(image, "__getitem__"):
        return image
    raise NofcError(f"image must be an array, a tensor or a file path, got {type(image).__name__}")


def _layout(shape: tuple[int, ...], channels: int, layout: str) -> str:
    if len(shape) == 2:
        if channels != 1:
            raise NofcError(f"image is grayscale {shape} but the model expects {channels} "
                            "channels")
        return "hw"
    if len(shape) != 3:
        raise NofcError(f"image must be (H, W), (H, W, C) or (C, H, W), got shape {shape}")
    if layout in ("hwc", "chw"):
        c = shape[2] if layout == "hwc" else shape[0]
        if c != channels:
            raise NofcError(f"image has {c} channels ({layout} {shape}) but the model expects "
                            f"{channels}")
        return layout
    if shape[2] == channels:
        return "hwc"
    if shape[0] == channels:
        return "chw"
    raise NofcError(f"image of shape {shape} has no axis of {channels} channels; pass "
                    "layout='hwc' or 'chw' and the right number of channels")


def _spatial_shape(shape, layout) -> tuple[int, int]:
    return (shape[1], shape[2]) if layout == "chw" else (shape[0], shape[1])


def _read(src, layout, y0, y1, x0, x1) -> np.ndarray:
    """Region as a (C, h, w) array."""
    if layout == "chw":
        region = src[:, y0:y1, x0:x1]
    else:
        region = src[y0:y1, x0:x1]
    region = np.asarray(region.compute() if hasattr(region, "compute") else region)
    if layout == "hw":
        return region[None]
    if layout == "hwc":
        return np.moveaxis(region, -1, 0)
    return region


def _to_tensor(region: np.ndarray, scale, mean, std, dtype, device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(region)).to(device=device, dtype=dtype)
    if scale != 1.0:
        x = x * scale
    if mean is not None:
        x = x - torch.as_tensor(mean, dtype=dtype, device=device).view(-1, 1, 1)
    if std is not None:
        x = x / torch.as_tensor(std, dtype=dtype, device=device).view(-1, 1, 1)
    return x


def _default_scale(dtype: np.dtype) -> float:
    if np.issubdtype(dtype, np.integer):
        return 1.0 / float(np.iinfo(dtype).max)
    return 1.0


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
    """
    H, W = image_hw
    stride = geo.stride
    fine = geo.factors(step)
    geo.check_fits((H, W))
    h, w = geo.output_shape((H, W), step=step)
    rf, rf_off = geo.receptive_field, geo.rf_offset
    per = [max(1, tile // stride[a]) * fine[a] for a in (0, 1)]  # map cells per block
    tiles = []
    for by, a in enumerate(range(0, h, per[0])):
        b = min(h, a + per[0])
        y0, y1, sy = _span(a, b, fine[0], stride[0], rf[0], rf_off[0], H)
        for bx, c in enumerate(range(0, w, per[1])):
            d = min(w, c + per[1])
            x0, x1, sx = _span(c, d, fine[1], stride[1], rf[1], rf_off[1], W)
            tiles.append(Tile((by, bx), (a, b, c, d), (y0, y1, x0, x1), (sy, sx)))
    return tiles, (h, w)


def _span(a, b, fine, stride, rf, rf_off, n):
    """Input span [p0, p1) for map cells a..b-1 (fine grid), and cells to skip."""
    # coarse cell i with shift k (fine index i * fine + k) starts at i*stride + k*step
    step = stride // fine
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
    return p0, p1, a - skip


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _model_hash(fcn: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in list(fcn.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1)[:4096].numpy().tobytes())
        h.update(str(float(t.double().sum())).encode() if t.is_floating_point() else b"")
    return h.hexdigest()[:16]


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
        return _read(src, self.layout, y0, y1, x0, x1)

    def __call__(self, src, t: Tile) -> np.ndarray:
        return self.compute(self.read(src, t), t)

    def compute(self, region: np.ndarray, t: Tile) -> np.ndarray:
        from .dense import dense_predict

        x = _to_tensor(region, self.scale, self.mean, self.std, self.dtype, self.device)
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
    src = open_image_array(image)
    lay = _layout(tuple(src.shape), size[0], layout)
    H, W = _spatial_shape(tuple(src.shape), lay)
    if step is not None:
        geo.check_step(step)
    tiles, (h, w) = plan_tiles(geo, (H, W), tile=tile, step=step)
    if scale is None:
        scale = _default_scale(np.dtype(getattr(src, "dtype", np.float32)))
    if device is None:
        device = next(fcn.parameters()).device if any(True for _ in fcn.parameters()) else "cpu"
    runner = _TileRunner(fcn.eval(), size, step, float(scale), mean, std, dtype,
                         torch.device(device), lay)
    # the number of classes, from a shape probe at the reference size
    k = _num_outputs(fcn, size)
    store = None
    done: set[tuple[int, int]] = set()
    if out is not None:
        meta = {
            "model": type(fcn).__name__,
            "model_hash": _model_hash(fcn),
            "input_size": list(size),
            "image_shape": [H, W],
            "tile": tile,
            "step": step,
            "scale": scale, "mean": _jsonable(mean), "std": _jsonable(std),
            "dtype": str(dtype),
        }
        store, done = _open_store(out, meta, (k, h, w), tiles, geo, metadata, _np_dtype(dtype))
    todo = [t for t in tiles if t.index not in done]
    _NAN_CELLS[0] = 0
    result = None if store is not None else np.zeros((k, h, w), dtype=_np_dtype(dtype))
    if backend == "local":
        _run_local(runner, src, todo, result, store, out, progress, total=len(tiles),
                   skipped=len(tiles) - len(todo))
    else:
        _run_dask(runner, src, todo, result, store, out, scheduler, workers, progress,
                  total=len(tiles))
    if _NAN_CELLS[0]:
        warnings.warn(f"the image has NaN or Inf pixels: {_NAN_CELLS[0]} map cells see them and "
                      "are NaN", stacklevel=2)
    return store if store is not None else result


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def _jsonable(v):
    if v is None:
        return None
    return [float(t) for t in np.atleast_1d(np.asarray(v, dtype=np.float64))]


def _num_outputs(fcn, size) -> int:
    from ._fx import probe

    rec = probe(fcn, (1, *size))
    shape = rec.shapes.get("output")
    if shape is None or len(shape) != 4:
        raise NofcError(f"the network's output is {shape}, not a (B, K, h, w) map")
    return int(shape[1])


def _progress(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tile", desc="nofc tiles",
                disable=not enabled, dynamic_ncols=True)


_NAN_CELLS = [0]  # NaN map cells written by the current run (see _warn_nan)


def _write_block(result, store, out, t: Tile, block: np.ndarray):
    a, b, c, d = t.out
    _NAN_CELLS[0] += int(np.isnan(block).any(0).sum())
    if store is not None:
        store[:, a:b, c:d] = block
        marker = Path(out) / _DONE_DIR / f"{t.index[0]}_{t.index[1]}"
        marker.touch()
    else:
        result[:, a:b, c:d] = block


def _run_local(runner, src, todo, result, store, out, progress, total, skipped):
    bar = _progress(total, skipped, progress)
    try:
        for t in todo:
            _write_block(result, store, out, t, runner(src, t))
            bar.update(1)
    finally:
        bar.close()


def _run_dask(runner, src, todo, result, store, out, scheduler, workers, progress, total):
    try:
        import dask
        from dask import delayed
    except ImportError:  # pragma: no cover
        raise NofcError("backend='dask' needs the scale extra: pip install 'nofc[scale]'") from None
    client = None
    cluster = None
    plugin_name = None
    if scheduler is not None or workers is not None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:  # pragma: no cover
            raise NofcError("a Dask scheduler needs 'distributed': pip install 'nofc[scale]'"
                            ) from None
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout="10s")
            except Exception as exc:  # noqa: BLE001
                raise NofcError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        else:
            cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1,
                                   processes=True, dashboard_address=None)
            client = Client(cluster)
    try:
        # one graph node each for the runner (the model) and the source: shipped to each
        # worker once and reused by all of its tiles
        runner_d = delayed(runner, pure=True, name="nofc-model")
        src_d = delayed(src, pure=True, name="nofc-image")
        if client is not None:
            from distributed import as_completed

            # the model travels inside a worker plugin: unpickled exactly once per worker
            # (workers that join later get it too), then used by every tile there
            plugin_name = f"nofc-model-{uuid.uuid4().hex[:12]}"
            client.register_plugin(_ModelPlugin(runner), name=plugin_name)
            runner_f = plugin_name
            workers_now = max(1, len(client.scheduler_info().get("workers", {})))
            limit = 2 * workers_now  # tiles in flight: memory stays bounded by the tile
            remote = isinstance(src, _TiffSource) or type(src).__module__.startswith("zarr")
            if remote:
                # workers read their own regions (the file must be reachable from them)
                [src_f] = client.scatter([src], broadcast=True)

            def submit(t):
                if remote:
                    return client.submit(_call, runner_f, src_f, t, pure=False)
                # in-memory or dask arrays: read here and send each tile only its region,
                # scattered rather than inlined so large arrays stay out of the graph
                region = client.scatter(runner.read(src, t), hash=False)
                return client.submit(_compute, runner_f, region, t, pure=False)

            queue = list(todo)
            futures = {}
            while queue and len(futures) < limit:
                t = queue.pop(0)
                futures[submit(t)] = t
            pending = as_completed(list(futures))
            bar = _progress(total, total - len(todo), progress)
            try:
                for fut in pending:
                    t = futures.pop(fut)
                    _write_block(result, store, out, t, fut.result())
                    bar.update(1)
                    if queue:
                        nxt = queue.pop(0)
                        f = submit(nxt)
                        futures[f] = nxt
                        pending.add(f)
            finally:
                bar.close()
        else:
            tasks = [delayed(_call)(runner_d, src_d, t) for t in todo]
            bar = _progress(total, total - len(todo), progress)
            try:
                # compute in waves so results are written (and resumable) as they finish
                wave = max(1, (os.cpu_count() or 1) * 2)
                for i in range(0, len(tasks), wave):
                    blocks = dask.compute(*tasks[i:i + wave], scheduler="threads")
                    for t, block in zip(todo[i:i + wave], blocks):
                        _write_block(result, store, out, t, block)
                        bar.update(1)
            finally:
                bar.close()
    finally:
        if client is not None:
            if plugin_name is not None:
                with contextlib.suppress(Exception):
                    client.unregister_worker_plugin(plugin_name)
            client.close()
        if cluster is not None:
            cluster.close()


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


def _open_store(out, meta, shape, tiles, geo, extra, np_dtype):
    try:
        import zarr
    except ImportError:  # pragma: no cover
        raise NofcError("out= needs zarr: pip install 'nofc[scale]'") from None
    from . import __version__

    fingerprint = _fingerprint(meta)
    path = Path(out)
    k, h, w = shape
    per_h = max(t.out[1] - t.out[0] for t in tiles)
    per_w = max(t.out[3] - t.out[2] for t in tiles)
    if path.exists():
        try:
            arr = zarr.open_array(str(path), mode="r+")
        except Exception:  # noqa: BLE001
            raise NofcError(f"{out} exists and is not a nofc zarr map; choose another --out "
                            "or remove it") from None
        old = dict(arr.attrs).get("nofc", {})
        if old.get("fingerprint") != fingerprint:
            diff = [key for key in meta if old.get("arguments", {}).get(key) != meta[key]]
            raise NofcError(f"{out} was written for different arguments ({', '.join(diff) or 'unknown'}"
                            "); refusing to mix maps: use another --out or delete it")
        done_dir = path / _DONE_DIR
        done = set()
        if done_dir.is_dir():
            for f in done_dir.iterdir():
                by, _, bx = f.name.partition("_")
                done.add((int(by), int(bx)))
        return arr, done
    if not path.parent.exists():
        raise NofcError(f"cannot write {out}: folder {path.parent} does not exist")
    arr = zarr.create_array(str(path), shape=(k, h, w), chunks=(k, per_h, per_w),
                            dtype=np_dtype, fill_value=np.nan)
    arr.attrs["nofc"] = {
        "fingerprint": fingerprint,
        "arguments": meta,
        "geometry": geo.as_dict(),
        "nofc_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"metadata": extra} if extra else {}),
    }
    (path / _DONE_DIR).mkdir(exist_ok=True)
    return arr, set()

