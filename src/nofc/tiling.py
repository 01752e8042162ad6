"""Dense maps of images of any size: exact halo tiling, zarr output, Dask.

The map is cut into blocks of output cells. Each block is computed from an input tile that
starts on a multiple of the network stride (so every layer's grid lines up with the whole
image's) and carries a halo of the receptive-field margin (so no kept cell ever sees the
tile's own border padding). The stitched map therefore equals ``dense_predict`` on the
whole image; memory is bounded by the tile, not the image. Finished blocks go to a sink
(``nofc.sinks``: memory or a zarr store); tiling does not care which. Run here on a CPU,
the same blocks come band by band down the image where the network can be cut into
stages (``_Bands``, ``nofc.streaming.RowStream``): the halo then costs a stage's own
field, not the network's.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import queue
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ._fx import dumps, loads, param_like, probe
from .crops import CropNet, map_network
from .dense import dense_predict, placed
from .dilation import fine_pass
from .engines import LOW_TOLERANCE, engine_precision, on_engine
from .errors import NofcError, call_model, check_input_size, first_line
from .images import BadRegion, Normalize
from .masks import mask_cells
from .placement import placement_of
from .precision import low_precision
from .sinks import MapFacts, MaskedSink, output_for
from .sources import open_source
from .streaming import row_stream
from .receptive import cached_geometry
from .tolerance import passes, tolerance_for

__all__ = ["tiled_predict", "Dask", "plan_tiles", "default_tile", "check_tileable", "num_outputs",
           "TileJob", "open_job", "run_jobs", "TILE_PIXELS"]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Tile:
    """One block of output cells and the input region it is computed from."""

    index: tuple[int, int]  # block index (by, bx)
    out: tuple[int, int, int, int]  # map cells (a, b, c, d): rows a..b-1, columns c..d-1
    inp: tuple[int, int, int, int]  # input pixels (y0, y1, x0, x1)
    skip: tuple[int, int]  # tile map rows/cols to drop at the start


def plan_tiles(geo, image_hw: tuple[int, int], *, tile: int, step=None,
               dilated=None) -> tuple[list[Tile], tuple[int, int]]:
    """Cut the map of an ``image_hw`` image into blocks of about ``tile`` input pixels.

    Returns the tiles and the map shape. Each tile's input starts on a multiple of the
    stride and reaches as far as the receptive field of its last cell (clipped to the
    image, where the network's own padding takes over exactly as on the whole image):
    ``Geometry.span``. ``dilated`` is the geometry of the dilated network that computes
    the map at ``step`` in one pass (``nofc.dilate``): its spans need no room for shifts.

    >>> import nofc
    >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
    >>> tiles, shape = plan_tiles(geo, (100, 80), tile=32)
    >>> len(tiles), shape, tiles[1].out, tiles[1].inp
    (6, (18, 13), (0, 8, 8, 13), (0, 60, 32, 80))
    """
    H, W = image_hw
    fine = geo.factors(step)
    geo.check_fits((H, W))
    h, w = geo.output_shape((H, W), step=step)
    per = [max(1, tile // geo.stride[a]) * fine[a] for a in (0, 1)]  # map cells per block
    run, run_step = (geo, step) if dilated is None else (dilated, None)
    y_spans = [(a, min(h, a + per[0]), *run.span(0, a, min(h, a + per[0]), H, step=run_step))
               for a in range(0, h, per[0])]
    x_spans = [(c, min(w, c + per[1]), *run.span(1, c, min(w, c + per[1]), W, step=run_step))
               for c in range(0, w, per[1])]
    tiles = [Tile((by, bx), (a, b, c, d), (y0, y1, x0, x1), (sy, sx))
             for by, (a, b, y0, y1, sy) in enumerate(y_spans)
             for bx, (c, d, x0, x1, sx) in enumerate(x_spans)]
    return tiles, (h, w)


# --------------------------------------------------------------------------- compute


_UNPICKLED = 0  # how many times a tile runner arrived in this process (tests: once/worker)


class _TileRunner:
    """Everything a worker needs to compute one tile; pickled once per worker."""

    def __setstate__(self, state):
        global _UNPICKLED
        _UNPICKLED += 1
        self.__dict__.update(state)

    def __init__(self, fcn, input_size, step, normalize: Normalize, dtype, device,
                 method="auto", edges="inside", pads=(0, 0, 0, 0), precision="fp32",
                 engine="torch"):
        # a fine step: tiles run the dilated network (at its own stride) when there is one
        fine = None if isinstance(fcn, CropNet) else fine_pass(
            fcn, input_size, cached_geometry(fcn, input_size).check_step(step), method)
        self.fcn = fcn if fine is None else fine.net
        self.dilated = None if fine is None else cached_geometry(fine.net, input_size)
        self.input_size = input_size
        self.step = step if fine is None else None
        self.normalize = normalize  # its scale decided for the image's pixels
        self.dtype = dtype
        self.device = device
        self.precision = precision
        self.engine = engine
        self.edges, self.pads = edges, tuple(pads)  # tiles are planned on the padded image

    def image_part(self) -> dict:
        """What this runner has for its image alone (the rest, the model, is shared by
        every image of a cohort): sent with each tile of a cluster stream."""
        return {"normalize": self.normalize, "edges": self.edges, "pads": self.pads}

    def for_image(self, part: dict | None) -> "_TileRunner":
        """This runner with another image's ``image_part`` (a shallow copy)."""
        if not part:
            return self
        runner = object.__new__(_TileRunner)  # not __setstate__: no unpickling counted
        runner.__dict__.update(self.__dict__, **part)
        return runner

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_placed"}

    def network(self) -> nn.Module:
        """The network on the runner's device in its dtype (a float32 network asked for a
        float64 map runs in float64: a copy, made once)."""
        if self.__dict__.get("_placed") is None:
            self._placed = placed(self.fcn, self.device, self.dtype)[0]
        return self._placed

    def image_hw(self, src) -> tuple[int, int]:
        """The image the tiles are planned on: the source with the edges' padding."""
        top, bottom, left, right = self.pads
        return (src.hw[0] + top + bottom, src.hw[1] + left + right)

    def read(self, src, t: Tile) -> np.ndarray:
        y0, y1, x0, x1 = t.inp
        if not any(self.pads):
            return src.read(slice(y0, y1), slice(x0, x1))  # (C, h, w)
        return self._read_padded(src, (y0, y1), (x0, x1))

    def _read_padded(self, src, ys, xs) -> np.ndarray:
        """The region ``ys x xs`` of the padded image: the pixels inside read, the rest
        zeros or the reflection ``dense_predict`` would pad the whole image with."""
        top, _, left, _ = self.pads
        hw = src.hw
        inner, widths = [], []
        for (a, b), before, n in ((ys, top, hw[0]), (xs, left, hw[1])):
            lo, hi = min(max(a - before, 0), n), max(min(b - before, n), 0)
            widths.append((lo - (a - before), (b - before) - hi))
            inner.append(slice(lo, hi))
        region = src.read(*inner)  # (C, h, w)
        if self.edges == "reflect":
            for axis, (w0, w1) in zip((1, 2), widths):
                if max(w0, w1) >= region.shape[axis]:  # pragma: no cover - tiles are larger
                    raise NofcError(f"internal: a {region.shape[axis]}-pixel tile cannot be "
                                    f"reflected by {max(w0, w1)}")
            return np.pad(region, ((0, 0), *widths), mode="reflect")
        return np.pad(region, ((0, 0), *widths))

    def __call__(self, src, t: Tile) -> np.ndarray:
        return self.compute(self.read(src, t), t)

    def compute(self, region: np.ndarray, t: Tile) -> np.ndarray:
        x = self.normalize.tensor(region, dtype=self.dtype, device=self.device)
        with torch.no_grad(), warnings.catch_warnings():
            # NaN/Inf pixels: dense_predict marks their cells NaN and would warn once per
            # tile in tile coordinates; tiled_predict warns once for the whole map instead
            warnings.simplefilter("ignore")
            scores = dense_predict(self.network(), x[None], input_size=self.input_size,
                                   step=self.step,
                                   device=self.device, precision=self.precision,
                                   engine=self.engine)[0]
        a, b, c, d = t.out
        sy, sx = t.skip
        block = scores[:, sy:sy + (b - a), sx:sx + (d - c)]
        if block.shape[1:] != (b - a, d - c):  # pragma: no cover - a planning bug
            raise NofcError(f"internal: tile {t.index} gave {tuple(block.shape)} for cells "
                            f"{t.out}")
        return block.cpu().numpy()


@dataclass(frozen=True)
class Dask:
    """Compute the tiles as a Dask graph (``tiled_predict(backend=Dask(...))``).

    With no arguments, Dask's threaded scheduler in this process; ``scheduler``: the
    cluster at that address (``"tcp://host:8786"``); ``workers``: a new
    ``distributed.LocalCluster`` of that many processes, closed when the run ends.

    >>> Dask(workers=0)
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: workers must be a positive number of processes, got 0
    """

    scheduler: str | None = None
    workers: int | None = None

    def __post_init__(self):
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise NofcError(f"workers must be a positive number of processes, got {w!r}")
        if self.scheduler is not None and w is not None:
            raise NofcError("give a scheduler address or a number of workers, not both")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise NofcError(f"scheduler must be an address such as 'tcp://host:8786', got "
                            f"{self.scheduler!r}")


def _backend(backend) -> Dask | None:
    """None for this process, else the Dask backend (``"dask"``: threaded)."""
    if isinstance(backend, Dask):
        return backend
    if backend == "dask":
        return Dask()
    if backend == "local":
        return None
    raise NofcError(f"backend must be 'local', 'dask' or a nofc.Dask(...), got {backend!r}")


def tiled_predict(
    fcn: nn.Module,
    image,
    input_size,
    tile: int | None = None,
    out: str | os.PathLike | None = None,
    backend: str | Dask = "local",
    *,
    step=None,
    method: str = "auto",
    normalize: Normalize | None = None,
    edges: str = "inside",
    mask=None,
    device=None,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
    engine: str = "torch",
    check: bool = True,
    progress: bool = True,
    stats: dict | None = None,
):
    """Dense map of an image of any size, tile by tile; equals ``dense_predict`` exactly.

    Args:
        fcn: the converted network (``nofc.convert``); a classifier that is not converted
            yet is converted first.
        image: numpy array or memmap, zarr array, dask array, tensor, a file path, or an
            image opened with its own options (``nofc.open_source(path, level=1)``: a
            slide's level or pixel size, a raster's bands, an array's layout, what an
            unreadable region does). TIFF, whole-slide images and rasters are read lazily
            region by region; PNG/JPEG whole. ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``.
        input_size: ``(C, H, W)`` the classifier was trained on.
        tile: input pixels per tile side (before the halo); memory grows with it. Default
            (``None``): ``default_tile``, as large as the memory budget ``TILE_PIXELS``
            allows until the halo costs at most a tenth of the work (ResNet-18: 4000),
            and at least 2048, or three times the receptive field's reach past the
            window where that is more (DenseNet-121: 6144 pixels, a halo of 2039).
            The blocks of the map (a store's chunks, what it resumes from); run here on
            a CPU, a network cut into stages computes them band by band down the image
            instead of tile by tile, each stage keeping the rows its next band reads, so
            no halo is computed twice (``_Bands``; docs/tiling.md).
        out: where the map goes (``nofc.sinks``), by suffix or as an output object with
            its own options. A ``.zarr`` store: chunks are written as they finish, a
            killed run started again with the same arguments resumes, and a store made
            with other arguments is refused. A ``.tif`` is a GeoTIFF with the map's
            georeferencing (level-0 pixels for slides), a ``.geojson`` QuPath detections
            (``nofc.sinks.GeoJsonOutput(path, threshold=0.8)`` for another threshold
            than 0.5; ``metadata={"classes": [...]}`` on any output names the classes),
            a ``.regions.geojson``, ``.gpkg`` or ``.fgb`` the cells merged into polygons
            per class (``nofc.sinks.RegionsOutput(path, exclude=("glass",))``).
            Another suffix is refused. ``None`` returns a numpy array.
        backend: ``"local"`` (this process), ``"dask"`` (a dask graph over the tiles on
            Dask's threaded scheduler) or ``nofc.Dask(scheduler="tcp://host:8786")`` /
            ``nofc.Dask(workers=4)`` (a cluster, or a new local one of 4 processes).
        step: map step in pixels (a divisor of the stride), default stride.
        method: for a finer step, as in ``dense_predict``: ``"dilate"`` runs the dilated
            network on every tile (halos sized for it), ``"shift"`` shift-and-stitch,
            ``"auto"`` the dilated one where it equals shift-and-stitch; ``"crops"`` the
            classifier on every window at ``step`` (``nofc.crops``), which ``"auto"`` also
            does, with a one-line warning, for a classifier that ``convert`` refuses.
        normalize: ``nofc.Normalize(mean=, std=, scale=)`` applied per tile:
            ``(x * scale - mean) / std``; by default ``scale`` is ``1 / max`` for integer
            images (255 for uint8) and 1 else, with no mean or std.
        edges: ``"inside"`` (one cell per window inside the image) or ``"zeros"`` /
            ``"reflect"`` (the image padded so that windows cover every pixel), as in
            ``dense_predict``; the map's windows are ``geo.with_edges(hw, edges)``'s.
        mask: ``"auto"``, a 2-D array or a mask file (``nofc.masks``): tiles without
            foreground are not computed, background cells are NaN.
        check: check a classifier converted here against itself first, as in
            ``dense_predict``.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"``, as in
            ``dense_predict`` (``nofc.precision``); the map stays float32.
        engine: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``, as in ``dense_predict``
            (``nofc.engines``): the engine's network is made and checked once, before any
            tile (on a cluster, again on each worker).
        stats: a dict to fill with ``windows`` (map cells), ``computed`` (cells of the
            tiles computed in this run), ``tiles`` and ``tiles_computed``.

    A region of the image that cannot be read (a corrupt or truncated TIFF tile) stops
    the run with one line naming the file and the region, or, for an image opened with
    ``open_source(..., on_error="skip")``, leaves its blocks NaN, warns once and lists them
    in the store's ``nofc.bad_blocks`` (a later run tries them again).

    On a cluster, workers may die or join mid-run: their blocks are recomputed elsewhere
    and the map is the same. A block that fails for a transient reason is tried
    ``_ATTEMPTS`` times; a lost scheduler, a full disk or a second run on the same store
    stop with one line saying how many blocks the store keeps: the same call resumes.

    Returns:
        ``(K, h, w)`` numpy array (float32, or float64 with ``dtype=torch.float64``), or
        the zarr array when ``out`` is given.

    >>> import numpy as np, nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> img = np.random.rand(300, 200).astype(np.float32)
    >>> nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=64, progress=False).shape
    (10, 68, 43)
    """
    dask = _backend(backend)
    job = open_job(fcn, image, input_size, tile=tile, out=out, step=step, method=method,
                   normalize=normalize, edges=edges, mask=mask, device=device, dtype=dtype,
                   check=check, precision=precision, engine=engine)
    with job:  # a store is locked against a second writer until the run ends
        if stats is not None:
            stats.update(job.stats)
        with _progress(len(job.tiles), len(job.tiles) - len(job.todo), progress) as bar:
            job.run(dask, bar)
    return job.finish(stacklevel=3)


class TileJob:
    """One image's tiled map, planned and with its sink open (``open_job``); what
    ``tiled_predict`` runs, and each input of a cohort (``nofc.cohort``).

    Attributes:
        src: the image (``nofc.open_source``); ``runner`` computes a tile of it.
        tiles: every block of the map; ``todo`` those still to compute (not in the sink,
            with foreground); ``held``: how many blocks the sink had when opened.
        sink: where blocks go (entered with the job); ``foreground``: the mask's cells or
            None; ``stats``: ``windows``, ``tiles``, ``tiles_computed``, ``computed``.
    """

    def __init__(self, runner, src, tiles, sink, foreground):
        self.runner, self.src, self.tiles, self.sink = runner, src, tiles, sink
        self.foreground = foreground
        self.held = sum(t.index in sink.done for t in tiles)
        todo = [t for t in tiles if t.index not in sink.done]
        # tiles without foreground go in as NaN, not computed
        self.todo = todo if foreground is None else sink.plan(todo)
        h, w = sink.shape[1:]
        self.stats = dict(windows=h * w, tiles=len(tiles), tiles_computed=len(self.todo),
                          computed=sum((t.out[1] - t.out[0]) * (t.out[3] - t.out[2])
                                       for t in self.todo))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.sink.__exit__(*exc)

    def blocks(self, bar) -> "_Blocks":
        return _Blocks(self.sink, bar, self.src.on_error)

    def run(self, dask: "Dask | None", bar) -> None:
        """Compute ``todo`` here (``dask`` None) or on Dask; ``bar.update(1)`` per block."""
        if dask is None:
            bands = _Bands.plan(self.runner, self.runner.image_hw(self.src),
                                self.sink.shape[1:], self.todo)
            _run_local(self.runner, self.src, self.todo, self.blocks(bar), bands)
        else:
            _run_dask(self.runner, self.src, self.todo, self.blocks(bar), dask)

    def finish(self, stacklevel: int = 2):
        """The map (``sink.finalize()``), with a warning for NaN cells or bad blocks."""
        sink = self.sink
        if sink.nan_cells:
            warnings.warn(f"the image has NaN or Inf pixels: {sink.nan_cells} map cells see "
                          "them and are NaN", stacklevel=stacklevel)
        if sink.bad:
            warnings.warn(f"{len(sink.bad)} map blocks are NaN because their image region "
                          f"cannot be read (listed in the store's nofc.bad_blocks when out= is "
                          f"given); the first: {next(iter(sink.bad.values()))}",
                          stacklevel=stacklevel)
        return sink.finalize()


def open_job(fcn, image, input_size, *, tile=None, out=None, step=None, method="auto",
             normalize=None, edges="inside", mask=None, device=None, dtype=torch.float32,
             check=True, precision="fp32", engine="torch") -> TileJob:
    """Plan the tiles of ``image`` and open its sink: ``tiled_predict``'s arguments (see
    there), the backend aside. A zarr store is locked until the job is left (``with``).

    >>> import numpy as np, nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> with open_job(fcn, np.zeros((100, 80), np.float32), (1, 32, 32), tile=32) as job:
    ...     len(job.todo), job.stats["windows"]
    (6, 234)
    """
    size = check_input_size(input_size)
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise NofcError(f"tile must be a positive number of pixels, got {tile!r}")
    norm = Normalize() if normalize is None else normalize
    if not isinstance(norm, Normalize):
        raise NofcError(f"normalize must be a nofc.Normalize(mean=, std=, scale=), got "
                        f"{type(normalize).__name__}")
    norm.check(size[0])
    output = output_for(out)  # an unknown suffix is refused before any work
    # a classifier not converted yet is converted here (or, where convert refuses it, and
    # for method="crops", run crop by crop: nofc.crops)
    fcn = map_network(fcn, size, method=method, step=step, check=check)
    net_geo = cached_geometry(fcn, size)
    tile = default_tile(net_geo) if tile is None else tile
    check_tileable(fcn, net_geo, tile)
    src = open_source(image, channels=size[0])
    steps = net_geo.check_step(step)
    geo = net_geo.with_edges(src.hw, edges, step=steps)  # the map's windows in the image
    geo.check_fits(src.hw)
    pads = geo.padding(src.hw, step=steps)
    hw = (src.hw[0] + pads[0] + pads[1], src.hw[1] + pads[2] + pads[3])  # tiles' image
    norm = norm.for_pixels(src.dtype)
    device = torch.device(param_like(fcn)[0] if device is None else device)
    # a bad one refused before any work
    low = low_precision(engine_precision(engine, precision), device, dtype)
    runner = _TileRunner(fcn.eval(), size, step, norm, dtype, device, method, edges, pads,
                         precision, engine)
    on_engine(runner.fcn, size, engine, fine=runner.dilated is not None, low=low,
              device=device, dtype=dtype)  # made and checked here, before any tile
    tiles, (h, w) = plan_tiles(net_geo, hw, tile=tile, step=step, dilated=runner.dilated)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    block = (max(t.out[1] - t.out[0] for t in tiles), max(t.out[3] - t.out[2] for t in tiles))
    fg = None if mask is None else mask_cells(mask, src, geo, step, (h, w))  # before out
    sink = output.open(MapFacts(
        (num_outputs(fcn, size), h, w), np_dtype, chunks=block, geo=geo,
        placement=placement_of(src, geo, steps), blocks=len(tiles),
        metadata={"image": src.describe()},
        arguments=lambda: {**_arguments(fcn, size, src.hw, tile, step, norm, dtype,
                                        precision),
                           **_reading(method, src.reading(), mask, edges)}))
    if fg is not None:
        sink = MaskedSink(sink, fg)
    try:
        return TileJob(runner, src, tiles, sink, fg)
    except BaseException:
        sink.close()
        raise


def run_jobs(jobs, backend="local", *, done, failed, bar) -> None:
    """Compute the maps of many images: ``jobs`` is an iterable of :class:`TileJob`, taken
    (so opened) only as the run reaches them; ``done(job)`` is called once a job's every
    block is in and its sink is closed, ``failed(job, error)`` when one of its blocks fails
    with a NofcError (its other blocks are dropped; the run goes on unless ``failed``
    raises). ``bar(job)`` is what counts that job's blocks (``update(1)`` per block).

    Here or on Dask's threaded scheduler the jobs run one after the other; on a cluster
    (``Dask(scheduler=)`` or ``Dask(workers=)``) their blocks form one stream: the model
    is sent once per worker (every job must share the network), and the next image's
    blocks go out while the last ones of the previous image are still computing. At most
    two blocks per worker thread are in flight, whatever the number of images.

    >>> import numpy as np, nofc
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> jobs = (open_job(fcn, np.zeros((64, 64), np.float32), (1, 32, 32)) for _ in range(3))
    >>> got = []
    >>> run_jobs(jobs, done=lambda job: got.append(job.finish().shape), failed=print,
    ...          bar=lambda job: type("Bar", (), {"update": lambda self, n: None})())
    >>> got
    [(10, 9, 9), (10, 9, 9), (10, 9, 9)]
    """
    dask = _backend(backend)
    if dask is None or (dask.scheduler is None and dask.workers is None):
        for job in jobs:
            try:
                with job:
                    job.run(dask, bar(job))
            except NofcError as exc:
                failed(job, exc)
            else:
                done(job)
        return
    with _dask_client(dask.scheduler, dask.workers) as client:
        _stream(client, iter(jobs), done=done, failed=failed, bar=bar)


def _stream(client, jobs, *, done, failed, bar) -> None:
    """The blocks of ``jobs`` as one stream over the cluster of ``client``. The next job
    is opened (its image read for a mask, its store made) in a thread while the blocks of
    the current one are computed, so that the workers do not wait for it."""
    first = next(jobs, None)
    if first is None:
        return
    open_jobs: list = [first]  # taken from ``jobs`` and not yet done or failed
    pool = ThreadPoolExecutor(1, thread_name_prefix="nofc-open")
    ahead: list = []  # the future of the job opened in the thread

    def parts():
        job = first
        while job is not None:
            if job.runner.fcn is not first.runner.fcn or job.runner.step != first.runner.step:
                raise NofcError("the images of one stream share the network and the step: "
                                "open every job with the same converted network")
            ahead[:] = [pool.submit(next, jobs, None)]  # one job ahead, no more
            yield _Part(job.runner, job.src, job.blocks(bar(job)), job.todo, job=job,
                        variant=job.runner.image_part())
            job = ahead.pop().result()
            if job is not None:
                open_jobs.append(job)

    def closed(job, exc=None) -> bool:
        if job not in open_jobs:
            return False
        open_jobs.remove(job)
        job.__exit__(None if exc is None else NofcError, exc, None)
        return True

    def finished(job):
        if closed(job):
            done(job)

    def isolated(job, exc):
        closed(job, exc)
        failed(job, exc)

    try:
        with _shipped(client, first.runner, first.sink.resume_note) as plugin:
            _Cluster(client, plugin, isolate=isolated, done=finished).drain(parts())
    except BaseException as exc:
        with contextlib.suppress(Exception):  # a job opened ahead is left open too
            job = ahead.pop().result() if ahead else None
            if job is not None:
                open_jobs.append(job)
        for job in open_jobs:  # what the stream left open: released
            job.__exit__(type(exc), exc, None)
        raise
    finally:
        pool.shutdown(wait=True)


def default_tile(geo) -> int:
    """The tile side for throughput within a memory budget, rounded to the stride.

    Neighbouring tiles both compute the strip where their fields overlap (``receptive
    field - stride`` pixels a side), so a tile of side ``t`` computes ``(t + extra)**2``
    pixels for ``t**2`` of map: the tile grows until that halo costs at most
    ``_HALO_COST`` of the work, but its input, halo included, stays within
    ``TILE_PIXELS`` (ResNet-18, stage by stage: a peak of 1.9 GB against 1.7 GB with
    2048-pixel tiles, measured on a 4600² TIFF to zarr). Never less than
    2048 pixels, or three times the field's reach past the window (a halo on both sides)
    where that is more, whatever the budget (DenseNet-121: 6144).

    >>> import nofc
    >>> geo = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))
    >>> default_tile(geo)
    2048
    """
    halo = max(max(0, -geo.rf_offset[a]) + max(0, geo.rf_offset[a] + geo.receptive_field[a]
                                                - geo.window[a]) for a in (0, 1))
    stride = max(geo.stride)
    least = max(_TILE, -(-3 * halo // stride) * stride)
    extra = max(geo.receptive_field[a] - geo.stride[a] for a in (0, 1))
    keep = (1 - _HALO_COST) ** 0.5  # the share of a side that is the tile's own
    wanted = -(-int(extra * keep / (1 - keep)) // stride) * stride
    budget = (math.isqrt(TILE_PIXELS) - extra) // stride * stride
    return max(least, min(wanted, budget))


_TILE = 2048  # the least default tile side
_HALO_COST = 0.1  # the share of a tile's work its halo may take, where the budget allows
TILE_PIXELS = 4608 ** 2  # input pixels of a default tile, halo included (the memory budget)


def check_tileable(fcn, geo, tile: int) -> None:
    """Refuse networks no tile can reproduce, and tiles smaller than the stride."""
    record = getattr(fcn, "_nofc_record", None)
    plan = getattr(record, "plan", None)
    context = [plan.context_reason(name) for name in plan.global_context] if plan else []
    context = context or list(geo.global_context)
    if context:
        more = f" (and {len(context) - 1} more)" if len(context) > 1 else ""
        raise NofcError(
            f"the network has global context inside its body: {context[0]}{more}; every "
            "map cell sees the whole image, so a tile cannot reproduce the whole-image map; "
            "run dense_predict on the whole image instead")
    if tile < geo.stride[0] or tile < geo.stride[1]:
        raise NofcError(f"tile={tile} is smaller than the network stride {geo.stride}; use a "
                        f"tile of at least {max(geo.stride)} pixels (a few times the window "
                        f"{geo.window} is efficient)")


def _arguments(fcn, size, hw, tile, step, norm: Normalize, dtype, precision="fp32") -> dict:
    """Everything the map depends on: a store written for other arguments is refused (a
    low precision is recorded where it is asked for, so older stores still resume)."""
    return {
        **({} if precision == "fp32" else {"precision": precision}),
        "model": type(fcn).__name__,
        "model_hash": _model_hash(fcn),
        "input_size": list(size),
        "image_shape": list(hw),
        "tile": tile,
        "step": step,
        "scale": norm.scale, "mean": _jsonable(norm.mean), "std": _jsonable(norm.std),
        **({"offset": _jsonable(norm.offset)} if norm.offset is not None else {}),
        "dtype": str(dtype),
    }


def _reading(method, reading: dict, mask, edges="inside") -> dict:
    """The options that change which pixels or which pass make the map, where they differ
    from the defaults (so a store written before they were recorded still resumes)."""
    if mask is not None and not isinstance(mask, (str, os.PathLike)):
        arr = np.ascontiguousarray(np.asarray(mask))
        mask = f"array {arr.shape} {hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"
    given = {"method": None if method == "auto" else method, **reading,
             "mask": None if mask is None else str(mask),
             "edges": None if edges == "inside" else edges}
    return {key: value for key, value in given.items() if value is not None}


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


def num_outputs(fcn, size) -> int:
    """The number of classes, from a shape probe at the reference size (one real forward
    for a network that is not a graph, such as a crop network)."""
    if isinstance(fcn, fx.GraphModule):
        shape = probe(fcn, (1, *size)).shapes.get("output")
    else:
        device, dtype = param_like(fcn)
        with torch.no_grad():
            shape = tuple(fcn(torch.zeros(1, *size, device=device, dtype=dtype)).shape)
    if shape is None or len(shape) != 4:
        raise NofcError(f"the network's output is {shape}, not a (B, K, h, w) map")
    return int(shape[1])


def _progress(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tile", desc="nofc tiles",
                disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------- run

_ATTEMPTS = 3  # tries per block for transient failures (OSError, a lost worker)


class _Blocks:
    """Where finished and failed blocks go, whichever backend computed them.

    A block that fails deterministically (a NofcError: an unreadable region) is reported
    once, with its block and region, or, for an unreadable region with
    ``on_error="skip"``, left NaN and listed; one that fails for a transient reason is
    tried again up to ``_ATTEMPTS`` times in all. Every stop says what the sink keeps.
    """

    def __init__(self, sink, bar, on_error: str):
        self.sink, self.bar, self.on_error = sink, bar, on_error

    def put(self, t: Tile, block: np.ndarray) -> None:
        self.sink.aggregate(t, block)
        self.bar.update(1)

    def skips(self, exc: NofcError) -> bool:
        """Whether a block failing with ``exc`` is left NaN (the run goes on)."""
        return isinstance(exc, BadRegion) and self.on_error == "skip"

    def failed(self, t: Tile, exc: NofcError) -> None:
        """Skip ``t`` (an unreadable region, with on_error="skip") or stop in one line."""
        if isinstance(exc, BadRegion):
            if self.skips(exc):
                self.sink.skip(t, str(exc))
                self.bar.update(1)
                return
            raise NofcError(f"{exc} (map block {t.index}); open_source(..., on_error='skip') "
                            f"(nofc heatmap --skip-bad-tiles) leaves such blocks NaN and "
                            f"goes on; "
                            f"{self.sink.resume_note()}") from None
        raise NofcError(f"{exc}; {self.sink.resume_note()}") from None

    def run(self, t: Tile, compute) -> None:
        """``compute()`` the block of ``t`` here, retrying transient failures."""
        try:
            block = _retried(compute, t)
        except NofcError as exc:
            self.failed(t, exc)
        else:
            self.put(t, block)


def _retried(compute, t: Tile):
    """``compute()``, tried again after an OSError (a network read cut short, say)."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return compute()
        except OSError as exc:
            if attempt == _ATTEMPTS:
                raise _gave_up(t, exc) from None


def _gave_up(t: Tile, exc: BaseException) -> NofcError:
    y0, y1, x0, x1 = t.inp
    return NofcError(f"map block {t.index} (image rows {y0}..{y1}, columns {x0}..{x1}) "
                     f"failed {_ATTEMPTS} times: {type(exc).__name__}: {first_line(exc)}")


_AHEAD = 1  # regions read ahead in a queue (one more in the reader's hands); 0: no threads
_BEHIND = 1  # finished blocks queued for the writer (one more being written)


def _run_local(runner, src, todo, blocks: _Blocks, bands: "_Bands | None" = None) -> None:
    """Compute the blocks of ``todo`` in this thread, one after the other, while a reader
    thread reads and decodes the next regions and a writer thread writes the finished
    blocks, so that neither waits for the other (TIFF decoding and zarr compression
    release the GIL).

    Memory: the tile computing, at most ``_AHEAD + 1`` regions read ahead and
    ``_BEHIND + 1`` blocks on their way to the sink. Only the writer touches the sink
    while it runs, in the order the blocks were computed; a block counts as done (the
    progress bar, a store's resume) once its write has finished. Whatever stops the run
    (a block that fails, a write that fails, KeyboardInterrupt) lets the writer finish
    the blocks queued before it first and leaves no thread running.

    With ``bands`` (:class:`_Bands`), the blocks are computed band by band down the image
    instead, with the same reader and writer; what they leave (a region that cannot be
    read, non-finite pixels) is computed here tile by tile.
    """
    if bands is not None:
        todo = bands.run(src, todo, blocks)
    if _AHEAD < 1 or len(todo) < 2:
        for t in todo:
            blocks.run(t, lambda t=t: runner(src, t))
        return
    with _Reader(runner, src, todo, blocks) as regions, _Writer(blocks) as writer:
        for t, region in regions:
            try:
                if isinstance(region, NofcError):
                    raise region
                block = _retried(lambda t=t, region=region: runner.compute(region, t), t)
            except NofcError as exc:
                writer.failed(t, exc)
            else:
                writer.put(t, block)


class _Bands:
    """The blocks of one image computed band by band down it, in strips across it
    (``nofc.streaming.RowStream``): each stage keeps the rows its next band reads, so no
    halo is computed twice down the image, and across it only between strips (none where
    the image fits one). The tiles' halo costs a DenseNet-121 (a 2263-pixel field) 62% more
    work at 8192x8192; bands cost their stages' own chunk halos, as one streamed pass.

    ``_run_local`` runs them where they apply (:meth:`plan`): a CPU pass in PyTorch, at
    the stride, of a network cut into stages that all run in chunks, with more than one
    block to compute. A band computes only the strips with a block to compute in its rows
    (under a mask, the strips with foreground); a strip left out starts its stream again
    where it is next computed. The blocks (``tile``) stay what a store keeps and resumes.
    A strip of a band spans at most the image pixels of a default tile with its halo (the
    same memory); a band at least ``RowStream.band`` image rows. Before the first block
    goes to the sink, one cell of the first band is checked against its tile; a region
    that cannot be read, non-finite pixels or a failed check hand the blocks not yet
    written to the tiles.
    """

    def __init__(self, runner, net, low, hw, strips, band_cells):
        self.runner, self.net, self.low, self.hw = runner, net, low, hw
        self.strips, self.band_cells = strips, band_cells
        self.geo = cached_geometry(net, runner.input_size)

    @staticmethod
    def plan(runner, hw, map_hw, todo) -> "_Bands | None":
        """The bands for ``runner``'s image of ``hw`` pixels (a map of ``map_hw`` cells),
        or None where tiles run (see the class)."""
        if (not _BANDS or len(todo) < 2 or runner.device.type != "cpu" or runner.engine != "torch"
                or runner.dilated is not None or runner.step is not None):
            return None
        size = runner.input_size
        low = low_precision(runner.precision, runner.device, runner.dtype)
        net = runner.network()
        if low is not None:
            net = low.network(net)
        geo = cached_geometry(net, size)
        h, w = map_hw
        first = row_stream(net, geo, hw, (0, w), channels=size[0])
        if first is None:
            return None
        stride = geo.stride[0]
        band_cells = max(1, -(-first.band // stride))
        rows = band_cells * stride
        extra = max(geo.receptive_field[a] - geo.stride[a] for a in (0, 1))
        # a default tile's input, halo included
        budget = _BAND_PIXELS or (default_tile(geo) + extra) ** 2
        for k in range(1, w + 1):  # the fewest strips within the budget
            per = -(-w // k)
            strips = [(c, min(w, c + per)) for c in range(0, w, per)]
            spans = [geo.span(1, c, d, hw[1]) for c, d in strips]
            if max(x1 - x0 for x0, x1, _ in spans) * rows <= budget:
                break
        return _Bands(runner, net, low, hw, strips, band_cells)

    def run(self, src, todo, blocks: _Blocks) -> list[Tile]:
        """Compute the blocks of ``todo``; returns those left to the tiles."""
        block_rows = sorted({t.out[:2] for t in todo})
        runs = []  # runs of consecutive block rows: map rows (start, end)
        for a, b in block_rows:
            if runs and runs[-1][1] == a:
                runs[-1][1] = b
            else:
                runs.append([a, b])
        bands = []  # (a, b, start): map rows a..b-1 of the run from start, equal heights
        for start, end in runs:
            n = -(-(end - start) // self.band_cells)
            per = -(-(end - start) // n)
            bands += [(r, min(end, r + per), start) for r in range(start, end, per)]
        # the strips each band computes: those with a block to compute in its rows (all of
        # them without a mask); a strip's stream runs on while the strip is computed
        wanted: dict = {}
        for t in todo:
            wanted.setdefault(t.out[:2], set()).update(
                j for j, (c, d) in enumerate(self.strips) if c < t.out[3] and t.out[2] < d)
        need = [set().union(*(js for (ra, rb), js in wanted.items() if ra < b and a < rb))
                for a, b, _ in bands]
        starts: dict = {}  # (band, strip) -> the map row the strip's stream started at
        for i, (a, b, start) in enumerate(bands):
            for j in need[i]:
                goes_on = i and bands[i - 1][2] == start and j in need[i - 1]
                starts[i, j] = starts[i - 1, j] if goes_on else a
        streams = {(j, row): row_stream(self.net, self.geo, self.hw, self.strips[j], start=row,
                                        channels=self.runner.input_size[0])
                   for (_, j), row in starts.items()}
        reads = {(i, j): Tile((i, j), (a, b, *self.strips[j]),
                              streams[j, starts[i, j]].read(a, b), (0, 0))
                 for i, (a, b, _) in enumerate(bands) for j in sorted(need[i])}
        left = list(todo)
        rows_done: list = []  # the map rows of the run so far: (a, tensor (K, rows, w))
        with (_Reader(self.runner, src, [t for t in reads.values() if t.inp[0] < t.inp[1]],
                      blocks) as regions, _Writer(blocks) as writer):
            regions = iter(regions)
            for i, (a, b, start) in enumerate(bands):
                if i and bands[i - 1][2] != start:
                    rows_done = []
                parts: list = [None] * len(self.strips)
                for j in sorted(need[i]):
                    t = reads[i, j]
                    region = None
                    if t.inp[0] < t.inp[1]:
                        got, region = next(regions)
                        if got != t:  # pragma: no cover - a planning bug
                            raise NofcError(f"internal: band region {got.index} read for "
                                            f"{t.index}")
                    x = self._input(region, t)
                    if x is None:  # unreadable, or NaN/Inf pixels: tiles from here on
                        return left
                    stream = streams[j, starts[i, j]]
                    with torch.no_grad(), (self.low.context() if self.low
                                           else contextlib.nullcontext()):
                        part = call_model(self.net, x, run=lambda: stream.advance(x, b))
                    parts[j] = part[0].float() if self.low else part[0]
                    if starts.get((i + 1, j)) != starts[i, j]:
                        del streams[j, starts[i, j]]  # its carried rows go
                some = next(p for p in parts if p is not None)
                band = torch.cat([p if p is not None else  # a strip of glass: not computed
                                  some.new_full((some.shape[0], b - a, d - c), float("nan"))
                                  for p, (c, d) in zip(parts, self.strips)], -1)  # (K, b - a, w)
                if i == 0 and not self._checked(src, a, self.strips[min(need[0])][0], band):
                    return left
                rows_done.append((a, band))
                left = self._emit(rows_done, left, writer)
        return left

    def _input(self, region, t: Tile) -> torch.Tensor | None:
        """The region as the network takes it, or None where the bands stop."""
        runner = self.runner
        if isinstance(region, NofcError):
            return None
        if region is None:  # the band needs no new image rows
            x = torch.zeros(1, runner.input_size[0], 0, t.inp[3] - t.inp[2],
                            dtype=runner.dtype, device=runner.device)
        else:
            x = runner.normalize.tensor(region, dtype=runner.dtype, device=runner.device)[None]
            if not bool(torch.isfinite(x.sum())):
                return None
        return x if self.low is None else self.low.input(x)

    def _checked(self, src, a: int, c: int, band: torch.Tensor) -> bool:
        """Whether cell ``(a, c)`` of the first band equals its tile's (else a warning)."""
        geo = cached_geometry(self.runner.network(), self.runner.input_size)
        y0, y1, sy = geo.span(0, a, a + 1, self.hw[0])
        x0, x1, sx = geo.span(1, c, c + 1, self.hw[1])
        t = Tile((-1, -1), (a, a + 1, c, c + 1), (y0, y1, x0, x1), (sy, sx))
        try:
            want = torch.from_numpy(_retried(lambda: self.runner(src, t), t))
        except NofcError:  # its region cannot be read: the tiles say so, block by block
            return False
        got = band[:, :1, c:c + 1].cpu()
        scale = float(want.abs().max())
        err = float((got.double() - want.double()).abs().max())
        tol = LOW_TOLERANCE if self.low is not None else tolerance_for(self.runner.dtype)
        if passes(*tol, err, scale):
            return True
        warnings.warn(f"nofc: the band pass gives cell ({a}, {c}) {err:.2e} away from its "
                      f"tile's (largest score {scale:.2e}); the map is computed tile by tile",
                      stacklevel=2)
        return False

    def _emit(self, rows_done: list, left: list[Tile], writer: "_Writer") -> list[Tile]:
        """Write the blocks whose map rows are all computed; returns those still left."""
        a0 = rows_done[0][0]
        end = rows_done[-1][0] + rows_done[-1][1].shape[1]
        ready = [t for t in left if a0 <= t.out[0] and t.out[1] <= end]
        if not ready:
            return left
        rows = torch.cat([band for _, band in rows_done], 1) if len(rows_done) > 1 else \
            rows_done[0][1]
        for t in ready:
            a, b, c, d = t.out
            writer.put(t, rows[:, a - a0:b - a0, c:d].numpy().copy())
        keep_from = max(t.out[1] for t in ready)
        rows_done[:] = [(keep_from, rows[:, keep_from - a0:])] if keep_from < end else []
        written = {t.index for t in ready}
        return [t for t in left if t.index not in written]


_BANDS = True  # False: tiles only
_BAND_PIXELS = None  # image pixels a strip of a band may span; None: a default tile's


_END = object()  # the reader's last item


class _Reader:
    """The regions of ``todo`` read (and retried) in a thread, ``_AHEAD`` queued: yields
    ``(tile, region)``, or ``(tile, NofcError)`` for a region that cannot be read; after
    one that stops the run (not skipped) it reads no further."""

    def __init__(self, runner, src, todo, blocks: _Blocks):
        self.runner, self.src, self.todo, self.blocks = runner, src, todo, blocks
        self.queue: queue.Queue = queue.Queue(_AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="nofc-reader", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()  # a reader waiting on a full queue gives up within _POLL
        self.thread.join()

    def _loop(self) -> None:
        try:
            for t in self.todo:
                if self.stop.is_set():
                    return
                try:
                    item = _retried(lambda t=t: self.runner.read(self.src, t), t)
                except NofcError as exc:
                    item = exc
                self._put((t, item))
                if isinstance(item, NofcError) and not self.blocks.skips(item):
                    break
        except BaseException as exc:  # noqa: BLE001 - a bug: raised in the main thread
            self._put((None, exc))
        self._put((None, _END))

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def __iter__(self):
        while True:
            t, item = self.queue.get()
            if t is None:
                if item is _END:
                    return
                raise item
            yield t, item


_POLL = 0.1  # seconds a reader blocked on a full queue waits before looking at stop


class _Writer:
    """``_Blocks.put`` (and the skips of ``_Blocks.failed``) in a thread, in order,
    ``_BEHIND`` queued. A write that fails is raised here at the next block, or at the
    end; the blocks queued after it are dropped (the ones before it are in the sink)."""

    def __init__(self, blocks: _Blocks):
        self.blocks = blocks
        self.queue: queue.Queue = queue.Queue(_BEHIND)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="nofc-writer", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._drain()  # the blocks queued are written first, whatever stopped the run
        if exc_type is None:
            self._raise()

    def _loop(self) -> None:
        while (op := self.queue.get()) is not None:
            if self.error is None:
                try:
                    op()
                except BaseException as exc:  # noqa: BLE001 - raised in the main thread
                    self.error = exc

    def _submit(self, op) -> None:
        self._raise()
        self.queue.put(op)

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _drain(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def put(self, t: Tile, block: np.ndarray) -> None:
        self._submit(lambda: self.blocks.put(t, block))

    def failed(self, t: Tile, exc: NofcError) -> None:
        """A skipped block is written in turn; one that stops the run stops it once every
        block before it is in (its message says what the sink keeps)."""
        if self.blocks.skips(exc):
            self._submit(lambda: self.blocks.failed(t, exc))
            return
        self._drain()
        self._raise()
        self.blocks.failed(t, exc)


def _run_dask(runner, src, todo, blocks: _Blocks, backend: Dask) -> None:
    try:
        import dask  # noqa: F401
    except ImportError:  # pragma: no cover
        raise NofcError("backend='dask' needs the scale extra: pip install 'nofc[scale]'") from None
    with _dask_client(backend.scheduler, backend.workers) as client:
        if client is None:
            _run_threads(runner, src, todo, blocks)
        else:
            _run_cluster(client, runner, src, todo, blocks)


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
                               dashboard_address=":0")  # a free port: none asked for
        client = Client(cluster)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception), _quiet(client.status != "running"):
            client.close(timeout=5)  # a lost scheduler: only its reconnect loop to stop
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence distributed's loggers: stopping the reconnect loop of a client whose
    scheduler is gone logs tracebacks, and nofc has already said it in one line."""
    import logging

    loggers = [logging.getLogger(n) for n in ("distributed", "distributed.client",
                                              "distributed.utils")] if enabled else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run_threads(runner, src, todo, blocks: _Blocks) -> None:
    """Dask's threaded scheduler, in waves so results are written (and resumable) as they
    finish; the runner (the model) and the source are one graph node each."""
    import dask
    from dask import delayed

    runner_d = delayed(runner, pure=True, name="nofc-model")
    src_d = delayed(src, pure=True, name="nofc-image")
    tasks = [delayed(_guarded)(runner_d, src_d, t) for t in todo]
    wave = max(1, (os.cpu_count() or 1) * 2)
    for i in range(0, len(tasks), wave):
        results = dask.compute(*tasks[i:i + wave], scheduler="threads")
        for t, result in zip(todo[i:i + wave], results):
            blocks.run(t, lambda result=result: _unguarded(result))


def _guarded(runner, src, t):
    """The block, or the NofcError that stopped it (so one bad block ends no wave)."""
    try:
        return _retried(lambda: _call(runner, src, t), t)
    except NofcError as exc:
        return exc


def _unguarded(result):
    if isinstance(result, NofcError):
        raise result
    return result


def _run_cluster(client, runner, src, todo, blocks: _Blocks) -> None:
    """A distributed cluster, surviving workers that die or join.

    The model travels inside a worker plugin, unpickled exactly once per worker; workers
    that join later (replacements included) get it before their first task. Nothing is
    pinned to one worker: a file or zarr source is read by the worker itself, an
    in-memory region travels inside its task, so the scheduler can recompute the tasks of
    a lost worker anywhere. At most two tiles per worker thread are in flight (memory
    stays bounded by the tile); each result is written as it arrives and then released,
    so a worker lost later costs no finished block.
    """
    with _shipped(client, runner, blocks.sink.resume_note) as plugin:
        _Cluster(client, plugin).drain([_Part(runner, src, blocks, todo)])


@contextlib.contextmanager
def _shipped(client, runner, note):
    """The model's plugin on every worker of ``client`` (its name), removed at the end;
    ``note()`` says what a run that stops now leaves."""
    import dask

    with contextlib.suppress(Exception):  # best effort: a scheduler may refuse run_on_
        client.run_on_scheduler(_drop_orphans)
    model = _ModelPlugin(runner)  # pickled here: a model that cannot be is one line
    plugin = f"nofc-model|{client.id}|{uuid.uuid4().hex[:12]}"  # one per run
    # regions inside tasks are the point (they survive a worker); Dask warns above 10 MB
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "4GB"}):
        try:  # registered inside: a registration that fails midway is removed too
            _register(client, model, plugin, note)
            yield plugin
        finally:
            if client.status == "running":
                with contextlib.suppress(Exception):
                    client.unregister_worker_plugin(plugin)


def _register(client, model: "_ModelPlugin", plugin: str, note) -> None:
    try:
        client.register_plugin(model, name=plugin)
    except Exception as exc:  # noqa: BLE001 - the workers' own error, as one line
        if client.status != "running":
            raise NofcError(f"lost the Dask scheduler{_at(client)} while sending it the "
                            f"model; {note()}") from None
        raise NofcError(f"cannot send the model to the Dask workers{_at(client)}: "
                        f"{type(exc).__name__}: {first_line(exc)}; {note()}") from None


class _Part:
    """One image's share of a cluster stream: its runner, source, blocks and tiles."""

    def __init__(self, runner, src, blocks: _Blocks, todo, job=None, variant=None):
        self.runner, self.src, self.blocks, self.job = runner, src, blocks, job
        self.variant = variant  # the runner's image_part, sent with each tile (a cohort)
        self.queue = iter(todo)
        self.live: set = set()  # its futures in flight
        self.queued, self.settled, self.error = False, False, None
        self.tries: dict[tuple[int, int], int] = {}  # submissions of each block
        # workers read their own regions (the file must be reachable from them)
        self.remote = getattr(src, "path", None) is not None or type(
            getattr(src, "array", src)).__module__.startswith("zarr")


class _Cluster:
    """Submits blocks to a cluster and takes their results as they come: the blocks of
    one image, or (``stream``) of many images one after the other, the next image's first
    blocks going out while the last ones of the previous image are still computing.

    With ``isolate``, an image whose block fails deterministically (a NofcError) is given
    to ``isolate(job, error)`` and its other blocks dropped; the stream goes on. ``done``
    is called with each image's job once its last block is in."""

    def __init__(self, client, plugin, *, isolate=None, done=None):
        self.client, self.plugin = client, plugin
        self.isolate, self.done = isolate, done
        self.limit, self.checked = 2, -1.0

    def drain(self, parts) -> None:
        """Compute the blocks of every part (an iterable, taken as it is needed)."""
        from distributed import as_completed

        parts = iter(parts)
        part, futures, pending = None, {}, as_completed([], loop=self.client.loop)
        while True:
            while len(futures) < self._limit():
                if part is None or part.error is not None:
                    part = next(parts, None)
                    if part is None:
                        break
                t = next(part.queue, None)
                if t is None:
                    part.queued = True
                    self._settle(part)
                    part = None
                    continue
                fut = self._guard(part, futures, lambda: self.submit(part, t))
                if fut is not None:
                    self._track(futures, pending, part, t, fut)
            if not futures:
                return
            fut = next(pending)
            if fut not in futures:  # a failed image's block, cancelled
                continue
            done_part, t = futures.pop(fut)
            done_part.live.discard(fut)
            retry = self._guard(done_part, futures, lambda: self.take(fut, done_part, t))
            if retry is not None:
                self._track(futures, pending, done_part, t, retry)
            elif done_part.queued:
                self._settle(done_part)

    def _track(self, futures, pending, part: _Part, t: Tile, fut) -> None:
        futures[fut] = (part, t)
        part.live.add(fut)
        pending.add(fut)

    def _guard(self, part: _Part, futures, step):
        """``step()``; with ``isolate``, an image that fails is set aside, not the run."""
        if part.error is not None:
            return None
        try:
            return step()
        except NofcError as exc:
            if self.isolate is None or self.client.status != "running":
                raise
            part.error = exc
            for fut in part.live:
                futures.pop(fut, None)
                fut.cancel()
            part.live.clear()
            self.isolate(part.job, exc)
            return None

    def _settle(self, part: _Part) -> None:
        """Hand an image whose every block is in to ``done``."""
        if part.queued and not part.live and part.error is None and not part.settled:
            part.settled = True
            if self.done is not None:
                self._guard(part, {}, lambda: self.done(part.job))

    def submit(self, part: _Part, t: Tile):
        """The future of block ``t``; None when its region could not even be read here."""
        part.tries[t.index] = part.tries.get(t.index, 0) + 1
        if part.remote:
            return self.client.submit(_call, self.plugin, part.src, t, part.variant,
                                      pure=False)
        try:  # in-memory or dask arrays: read here, the region goes inside the task
            region = _retried(lambda: part.runner.read(part.src, t), t)
        except NofcError as exc:
            part.blocks.failed(t, exc)
            return None
        return self.client.submit(_compute, self.plugin, region, t, part.variant, pure=False)

    def take(self, fut, part: _Part, t: Tile):
        """Write a finished block; a new future when a failed one is worth another try."""
        from distributed.scheduler import KilledWorker

        try:
            block = fut.result()
        except NofcError as exc:  # deterministic: reported once (or skipped)
            part.blocks.failed(t, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - sorted out below
            if isinstance(exc, CancelledError) or self.client.status != "running":
                raise NofcError(f"lost the Dask scheduler{_at(self.client)} while computing "
                                f"map block {t.index}; {part.blocks.sink.resume_note()}"
                                ) from None
            if not isinstance(exc, (OSError, KilledWorker)):
                raise  # a bug, not a fault: its own traceback
            if part.tries[t.index] >= _ATTEMPTS:
                part.blocks.failed(t, _gave_up(t, exc))
                return None
            return self.submit(part, t)  # a worker lost with the result, a read cut short
        finally:
            fut.release()  # a worker lost from now on costs this block nothing
        part.blocks.put(t, block)
        return None

    def _limit(self) -> int:
        """Two tiles per worker thread, recounted once a second (workers come and go)."""
        now = time.monotonic()
        if now - self.checked > 1.0:
            self.checked = now
            with contextlib.suppress(Exception):  # a lost scheduler shows in the futures
                self.limit = 2 * max(1, sum(self.client.nthreads().values()))
        return self.limit


async def _drop_orphans(dask_scheduler) -> None:
    """Unregister the model plugins of runs whose client is gone (killed): the scheduler
    would otherwise keep them, and every worker that joins would load those models too."""
    for name in list(dask_scheduler.worker_plugins):
        part = name.split("|")
        if part[0] == "nofc-model" and len(part) == 3 and part[1] not in dask_scheduler.clients:
            await dask_scheduler.unregister_worker_plugin(comm=None, name=name)


def _at(client) -> str:
    address = getattr(getattr(client, "scheduler", None), "address", None)
    return f" at {address}" if address else ""


def _worker_runner(runner):
    """The runner itself, or the one a worker plugin of that name holds."""
    if isinstance(runner, str):
        from distributed import get_worker

        worker = get_worker()
        plugin = worker.plugins[runner]
        if plugin.runner is None:
            raise NofcError(f"the Dask worker at {worker.address} cannot load the model "
                            f"({plugin.error}); every worker must be able to import the "
                            f"modules that define {plugin.model}")
        return plugin.runner
    return runner


def _call(runner, src, t, variant=None):
    return _worker_runner(runner).for_image(variant)(src, t)


def _compute(runner, region, t, variant=None):
    return _worker_runner(runner).for_image(variant).compute(region, t)


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - dask is the optional scale extra
    _WorkerPlugin = object


class _ModelPlugin(_WorkerPlugin):
    """Holds the tile runner (and so the model) on each Dask worker.

    The runner travels pickled by ``_fx.dumps``, which never traces on loading (torch's
    own pickle of a GraphModule traces its code again, and the tracer patches
    ``nn.Module.__call__`` for the whole worker process: a tile of another run on that
    worker would fail meanwhile). A worker that cannot load it (a module it cannot
    import) keeps the error for the run's tasks to report in one line, rather than
    failing to start: a plugin left behind never stops a worker.
    """

    def __init__(self, runner: _TileRunner):
        self.model = type(runner.fcn).__name__
        try:
            self.payload = dumps(runner)
        except Exception as exc:  # noqa: BLE001 - whatever the model holds
            raise NofcError(f"cannot send {self.model} to the Dask workers: it cannot be "
                            f"pickled ({type(exc).__name__}: {first_line(exc)})") from None
        self.runner, self.error = None, None

    def __getstate__(self):
        return {"model": self.model, "payload": self.payload}

    def __setstate__(self, state):
        self.__dict__.update(state, runner=None, error=None)

    def setup(self, worker=None):
        try:
            self.runner = loads(self.payload)
        except Exception as exc:  # noqa: BLE001 - reported by the run's tasks
            self.error = f"{type(exc).__name__}: {first_line(exc)}"
